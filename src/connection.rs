//! One connection: HTTP upgrade on `/ws`, the handshake, then the session
//! loop that reads frames, runs requests concurrently and writes responses
//! through a bounded outbox (SPEC §4, §5).
//!
//! Handlers never see bytes or WebSocket messages: this module turns frames
//! into calls on the `Registry` and results back into frames.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, sleep, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};

use crate::admission::Ticket;
use crate::auth::handshake::{self, Authenticated, Issued};
use crate::protocol::frames;
use crate::protocol::inbound::{self, Inbound};
use crate::protocol::{ApiError, ErrorCode, close};
use crate::rpc::{Caller, Registry};
use crate::sessions::{Outbound, Outbox, OutboxReceiver, SessionHandle};
use crate::state::AppState;
use tokio_util::sync::CancellationToken;

/// Any byte stream a connection can run on (TCP or TLS over TCP).
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
pub(crate) type BoxIo = Box<dyn Io>;

type Ws = WebSocketStream<BoxIo>;

const PING_EVERY: Duration = Duration::from_secs(20);
const SILENCE_LIMIT: Duration = Duration::from_secs(60);
const MAX_HTTP_HEAD: usize = 16 * 1024;
/// How long shutdown waits for a session's in-flight requests.
const DRAIN_ON_SHUTDOWN: Duration = Duration::from_secs(10);
/// Per-connection socket buffers (see `upgrade`).
const READ_BUFFER: usize = 1024;
const WRITE_BUFFER: usize = 4 * 1024;
/// Frames queued for the writer beyond which the session loop lets the
/// writer run before it reads on (both run in one task).
const YIELD_TO_WRITER: usize = 64;
/// `retry_after_ms` suggested with `busy`.
const BUSY_RETRY_MS: u64 = 50;

/// Bytes a peer may send after the HTTP head and before it authenticates:
/// one handshake frame of at most [`PRE_AUTH_FRAME`] bytes, its header, and
/// what a reader buffers ahead of it.
const PRE_AUTH_BYTES: usize = 8 * 1024;
/// The largest frame accepted before authentication (SPEC §4 v1.1).
pub(crate) const PRE_AUTH_FRAME: usize = 4 * 1024;
/// How long the writer may be stuck on a peer that does not read.
const WRITE_STALL: Duration = Duration::from_secs(30);

/// Serves one accepted connection to the end. `ticket` is its place among
/// unauthenticated connections, given up once the handshake succeeds.
pub(crate) async fn serve(
    state: Arc<AppState>,
    registry: Registry,
    io: BoxIo,
    peer: SocketAddr,
    ticket: Ticket,
) {
    let cfg = state.config();
    let auth_deadline = Instant::now() + Duration::from_secs(cfg.server.auth_timeout_secs);
    let budget = PreAuthBudget::new(PRE_AUTH_BYTES);
    let io: BoxIo = Box::new(Limited {
        inner: io,
        budget: budget.clone(),
    });
    let origins = OriginPolicy {
        web_origin: &state.web_origin,
        allowed: &cfg.server.allowed_origins,
    };
    let upgraded = tokio::select! {
        // Boxed: a pending future's state lives in the connection task for its
        // whole life, and the upgrade/handshake states are only needed briefly.
        r = Box::pin(timeout_at(auth_deadline, upgrade(io, cfg.server.max_frame_bytes, &origins, &budget))) => r,
        _ = ticket.evicted.cancelled() => None,
        _ = state.shutdown.cancelled() => return,
    };
    let ws = match upgraded {
        Some(Ok(ws)) => ws,
        // Silent past the deadline, or pushed out by newer connections.
        None => {
            state.limiter.record_failure(peer.ip(), false, "timeout");
            return;
        }
        Some(Err(_)) => return,
    };
    let (sink, mut stream) = ws.split();
    let (outbox, rx) = Outbox::new();
    let (close_tx, close_rx) = tokio::sync::oneshot::channel::<(u16, String)>();
    let mut closer = Closer {
        close_tx: Some(close_tx),
    };
    // The writer runs in this task, beside the reader, not as a task of
    // its own: both halves of the socket wake the same task, so a frame
    // read never wakes a second task (and with it another worker thread).
    let own = outbox.own_task();
    let written = CancellationToken::new();
    let stop_writer = CancellationToken::new();
    let writer = {
        let (outbox, written, stop) = (outbox.clone(), written.clone(), stop_writer.clone());
        async move {
            tokio::select! {
                _ = write_loop(sink, rx, close_rx, outbox) => {}
                _ = stop.cancelled() => {}
            }
            written.cancel();
        }
    };
    let rest = async move {
        converse(
            &state,
            registry,
            &mut stream,
            &mut closer,
            &outbox,
            peer,
            ticket,
            &budget,
            auth_deadline,
            &cfg,
        )
        .await;
        drop(outbox);
        drop(closer);
        // Let the writer send the close frame, and keep reading meanwhile so
        // the peer's unread bytes do not turn our FIN into a reset.
        let drain = async { while let Some(Ok(_)) = stream.next().await {} };
        let _ = timeout(
            Duration::from_secs(2),
            futures_util::future::join(drain, written.cancelled()),
        )
        .await;
        stop_writer.cancel();
    };
    // The reader half first, then the writer, in every poll: what the
    // reader queued is written in the same poll, without a wake-up.
    let (mut writer, mut rest) = (std::pin::pin!(writer), std::pin::pin!(rest));
    let (mut writer_done, mut rest_done) = (false, false);
    std::future::poll_fn(|cx| {
        if !rest_done {
            rest_done = own.enter(|| rest.as_mut().poll(cx)).is_ready();
        }
        if !writer_done {
            writer_done = writer.as_mut().poll(cx).is_ready();
        }
        if writer_done && rest_done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
}

/// The handshake, then (once authenticated) the session, on an upgraded
/// connection whose writer is already running.
#[allow(clippy::too_many_arguments)]
async fn converse(
    state: &Arc<AppState>,
    registry: Registry,
    stream: &mut SplitStream<Ws>,
    closer: &mut Closer,
    outbox: &Outbox,
    peer: SocketAddr,
    ticket: Ticket,
    budget: &PreAuthBudget,
    auth_deadline: Instant,
    cfg: &crate::config::Config,
) {
    let issued = Issued::new(state.clock.now_ms());
    outbox.push(frames::challenge(
        state.key.public_b64(),
        &issued.nonce,
        issued.ts,
    ));

    // The deadline is for the peer's answer; once it has arrived, the
    // server's own work on it (signature, database) is not cut short.
    let first = tokio::select! {
        r = Box::pin(read_handshake_frame(stream, closer, budget)) => r,
        _ = tokio::time::sleep_until(auth_deadline) => {
            state.limiter.record_failure(peer.ip(), false, "timeout");
            closer.close(close::AUTH_TIMEOUT, "authentication timeout");
            None
        }
        _ = ticket.evicted.cancelled() => {
            state.limiter.record_failure(peer.ip(), false, "timeout");
            closer.close(close::AUTH_TIMEOUT, "authentication timeout: the server needs the room");
            None
        }
        _ = outbox.closed() => None,
        _ = state.shutdown.cancelled() => {
            closer.close(close::GOING_AWAY, "server shutting down");
            None
        }
    };
    let authed = match first {
        None => None,
        Some(text) => match handshake::handle(state, &issued, peer.ip(), &text).await {
            Ok(a) => Some(a),
            Err(refused) => {
                // Queued before the close request, so the writer sends it first.
                outbox.push(refused.frame());
                closer.close(close::AUTH_FAILED, refused.code.as_str());
                None
            }
        },
    };
    drop(ticket);
    if let Some(a) = authed {
        tracing::Span::current().record("device", a.device_id.as_str());
        budget.lift();
        outbox.push(a.reply.clone());
        let mut session = Session::new(
            state.clone(),
            registry,
            &a,
            outbox.clone(),
            cfg.server.max_in_flight,
            peer,
        );
        session.run(stream, closer).await;
    }
}

/// The bytes a connection may still read before it authenticates; lifted
/// (unlimited) once it has.
#[derive(Clone)]
struct PreAuthBudget(Arc<AtomicUsize>);

impl PreAuthBudget {
    fn new(n: usize) -> Self {
        PreAuthBudget(Arc::new(AtomicUsize::new(n)))
    }
    fn lift(&self) {
        self.0.store(usize::MAX, Ordering::Relaxed);
    }
    fn exhausted(&self) -> bool {
        self.0.load(Ordering::Relaxed) == 0
    }
}

/// A stream that refuses to read beyond its [`PreAuthBudget`]: a peer that
/// has not authenticated cannot make the server buffer a large frame.
struct Limited {
    inner: BoxIo,
    budget: PreAuthBudget,
}

impl AsyncRead for Limited {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let left = self.budget.0.load(Ordering::Relaxed);
        if left == usize::MAX {
            return std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        if left == 0 {
            return std::task::Poll::Ready(Err(std::io::Error::other(
                "pre-authentication read limit",
            )));
        }
        let n = left.min(buf.remaining());
        let mut limited = buf.take(n);
        let poll = std::pin::Pin::new(&mut self.inner).poll_read(cx, &mut limited);
        let read = limited.filled().len();
        if read > 0 {
            // SAFETY: `read` bytes were initialised and filled by the inner read.
            unsafe { buf.assume_init(read) };
            buf.advance(read);
            let _ = self
                .budget
                .0
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    (v != usize::MAX).then(|| v.saturating_sub(read))
                });
        }
        poll
    }
}

impl AsyncWrite for Limited {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Which browser origins may open `/ws` (SPEC §4, §11): requests without an
/// `Origin` header (native clients) always may.
pub(crate) struct OriginPolicy<'a> {
    pub web_origin: &'a str,
    pub allowed: &'a [String],
}

impl OriginPolicy<'_> {
    /// Origins are compared as whole strings, port included.
    pub(crate) fn allows(&self, origin: &[u8]) -> bool {
        let Ok(origin) = std::str::from_utf8(origin) else {
            return false;
        };
        (!self.web_origin.is_empty() && origin == self.web_origin)
            || self.allowed.iter().any(|a| a == origin)
    }
}

async fn timeout_at<F: std::future::Future>(deadline: Instant, f: F) -> Option<F::Output> {
    tokio::time::timeout_at(deadline, f).await.ok()
}

/// Sends the close frame once.
struct Closer {
    close_tx: Option<tokio::sync::oneshot::Sender<(u16, String)>>,
}

impl Closer {
    fn close(&mut self, code: u16, reason: &str) {
        if let Some(tx) = self.close_tx.take() {
            let _ = tx.send((code, reason.to_string()));
        }
    }
}

/// Reads the HTTP request head; serves the web companion's files (`web.rs`),
/// answers 404 for any other path but `/ws`, 426 for
/// a non-upgrade request, 403 for a foreign `Origin`, and 101 to a
/// WebSocket upgrade.
async fn upgrade(
    mut io: BoxIo,
    max_frame_bytes: usize,
    origins: &OriginPolicy<'_>,
    budget: &PreAuthBudget,
) -> std::io::Result<Ws> {
    // The HTTP head has its own limit; the pre-auth budget counts from the
    // first WebSocket byte.
    let saved = budget.0.swap(usize::MAX, Ordering::Relaxed);
    let mut buf = Vec::with_capacity(1024);
    let head_len = loop {
        let mut chunk = [0u8; 2048];
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        if buf.len() > MAX_HTTP_HEAD {
            io.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await?;
            return Err(std::io::ErrorKind::InvalidData.into());
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let parsed = req.parse(&buf[..head_len]);
    let path = req.path.unwrap_or("");
    let path_only = path.split('?').next().unwrap_or("");
    // The web companion's page and assets (SPEC §11): answered, then closed.
    if parsed.is_ok() && req.method == Some("GET") && crate::web::is_page(path_only) {
        crate::web::serve(&mut io, path_only, origins.web_origin).await?;
        return Err(std::io::ErrorKind::ConnectionAborted.into());
    }
    if parsed.is_err() || req.method != Some("GET") || path_only != "/ws" {
        let (status, body) = if parsed.is_err() {
            ("400 Bad Request", "malformed HTTP request\n")
        } else {
            ("404 Not Found", "not found\n")
        };
        let resp = format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        io.write_all(resp.as_bytes()).await?;
        let _ = io.shutdown().await;
        return Err(std::io::ErrorKind::NotFound.into());
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    if let Some(origin) = header("origin")
        && !origins.allows(origin)
    {
        let body = "this origin may not open the WebSocket\n";
        let resp = format!(
            "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        io.write_all(resp.as_bytes()).await?;
        let _ = io.shutdown().await;
        // Debug-formatted: the header is the peer's text, escaped in the log.
        tracing::debug!(origin = ?String::from_utf8_lossy(origin), "upgrade from a foreign origin refused");
        return Err(std::io::ErrorKind::PermissionDenied.into());
    }
    let is_upgrade = header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case(b"websocket"));
    let key = header("sec-websocket-key");
    let version_ok = header("sec-websocket-version") == Some(b"13".as_slice());
    let (true, Some(key), true) = (is_upgrade, key, version_ok) else {
        let body = "this endpoint speaks WebSocket (version 13) only\n";
        let resp = format!(
            "HTTP/1.1 426 Upgrade Required\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        io.write_all(resp.as_bytes()).await?;
        let _ = io.shutdown().await;
        return Err(std::io::ErrorKind::InvalidData.into());
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key);
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
    );
    io.write_all(resp.as_bytes()).await?;
    let leftover = buf[head_len..].to_vec();
    if leftover.len() > PRE_AUTH_BYTES {
        return Err(std::io::ErrorKind::InvalidData.into());
    }
    budget
        .0
        .store(saved.saturating_sub(leftover.len()), Ordering::Relaxed);
    // Small buffers: tungstenite's 128 KiB defaults cost ~140 KB per idle
    // session. Frames larger than the read buffer still arrive whole.
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(Some(max_frame_bytes))
        .max_frame_size(Some(max_frame_bytes));
    Ok(WebSocketStream::from_partially_read(io, leftover, Role::Server, Some(config)).await)
}

/// Writes queued frames, flushing once per batch, then the close frame. A
/// peer that does not read for [`WRITE_STALL`] is dropped: the writer ends,
/// its queued frames are freed and the connection is closed.
async fn write_loop(
    mut sink: SplitSink<Ws, Message>,
    mut rx: OutboxReceiver,
    mut close_rx: tokio::sync::oneshot::Receiver<(u16, String)>,
    outbox: Outbox,
) {
    let to_msg = |o: Outbound| match o {
        Outbound::Text(t) => Message::text(t),
        Outbound::Ping => Message::Ping(Default::default()),
    };
    // Each write must make progress within WRITE_STALL, and stops at once
    // when the session is closed as a slow consumer.
    macro_rules! io {
        ($e:expr) => {
            if !guarded(&outbox, $e).await {
                return;
            }
        };
    }
    loop {
        tokio::select! {
            biased;
            first = rx.recv() => {
                let Some(first) = first else { break };
                rx.release(&first);
                io!(sink.feed(to_msg(first)));
                let mut n = 1;
                while n < 256 {
                    let Some(o) = rx.try_recv() else { break };
                    rx.release(&o);
                    io!(sink.feed(to_msg(o)));
                    n += 1;
                }
                io!(sink.flush());
            }
            c = &mut close_rx => {
                // Send what is already queued (e.g. an auth_error), then close.
                while let Some(o) = rx.try_recv() {
                    rx.release(&o);
                    io!(sink.feed(to_msg(o)));
                }
                if let Ok((code, reason)) = c {
                    let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
                    io!(sink.send(Message::Close(Some(frame))));
                }
                io!(sink.flush());
                return;
            }
        }
    }
    // Every sender is gone: close with the requested code, if any.
    if let Ok((code, reason)) = close_rx.try_recv() {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        };
        let _ = timeout(WRITE_STALL, sink.send(Message::Close(Some(frame)))).await;
        let _ = timeout(WRITE_STALL, sink.flush()).await;
        return;
    }
    let _ = timeout(WRITE_STALL, sink.close()).await;
}

/// Runs one write of the writer; false if the writer must stop (the write
/// failed, stalled for [`WRITE_STALL`], or the session was closed as a slow
/// consumer — its queued frames are then freed with the writer).
async fn guarded<T, E>(
    outbox: &Outbox,
    write: impl std::future::Future<Output = Result<T, E>>,
) -> bool {
    tokio::pin!(write);
    let stall = sleep(WRITE_STALL);
    tokio::pin!(stall);
    let mut watch_close = true;
    loop {
        tokio::select! {
            r = &mut write => {
                if r.is_err() {
                    outbox.close(close::GOING_AWAY);
                }
                return r.is_ok();
            }
            _ = &mut stall => {
                tracing::warn!("peer stopped reading: dropping the connection");
                outbox.close(close::SLOW_CONSUMER);
                return false;
            }
            _ = outbox.closed(), if watch_close => {
                if outbox.close_code() == close::SLOW_CONSUMER {
                    return false;
                }
                // Another close (revocation, shutdown): finish the write so
                // the close frame can follow.
                watch_close = false;
            }
        }
    }
}

/// Reads the peer's answer to the challenge (its first text frame); None if
/// the connection closed or broke a limit (the close is requested).
async fn read_handshake_frame(
    stream: &mut SplitStream<Ws>,
    closer: &mut Closer,
    budget: &PreAuthBudget,
) -> Option<String> {
    while let Some(msg) = stream.next().await {
        let text = match msg {
            Ok(Message::Text(t)) => t,
            // Not JSON text: refused as `invalid_request` like any malformed frame.
            Ok(Message::Binary(_)) => Default::default(),
            Ok(Message::Close(_)) => return None,
            Ok(_) => continue,
            Err(WsError::Capacity(CapacityError::MessageTooLong { .. })) => {
                closer.close(close::TOO_BIG, "frame too large");
                return None;
            }
            Err(_) if budget.exhausted() => {
                closer.close(close::TOO_BIG, "frame too large before authentication");
                return None;
            }
            Err(_) => return None,
        };
        if text.len() > PRE_AUTH_FRAME {
            closer.close(close::TOO_BIG, "frame too large before authentication");
            return None;
        }
        return Some(text.as_str().to_string());
    }
    None
}

/// In-flight request ids of one session (envelope and JSON-RPC tracked apart).
#[derive(Default)]
struct InFlight {
    envelope: Mutex<HashSet<String>>,
    jsonrpc: Mutex<HashSet<String>>,
    count: AtomicUsize,
}

impl InFlight {
    fn set(&self, jsonrpc: bool) -> std::sync::MutexGuard<'_, HashSet<String>> {
        let m = if jsonrpc {
            &self.jsonrpc
        } else {
            &self.envelope
        };
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Err(code) if the id is a duplicate or the session is at its cap.
    fn try_insert(&self, jsonrpc: bool, id: &str, max: usize) -> Result<(), ErrorCode> {
        let mut set = self.set(jsonrpc);
        if set.contains(id) {
            return Err(ErrorCode::DuplicateRequestId);
        }
        if self.count.load(Ordering::SeqCst) >= max {
            return Err(ErrorCode::Busy);
        }
        set.insert(id.to_string());
        self.count.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn remove(&self, jsonrpc: bool, id: &str) {
        if self.set(jsonrpc).remove(id) {
            self.count.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// One request being run by its session's task (see [`Session::run`]).
type Call = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// An authenticated session.
struct Session {
    state: Arc<AppState>,
    registry: Registry,
    handle: Arc<SessionHandle>,
    outbox: Outbox,
    inflight: Arc<InFlight>,
    max_in_flight: usize,
    peer: SocketAddr,
}

impl Session {
    fn new(
        state: Arc<AppState>,
        registry: Registry,
        a: &Authenticated,
        outbox: Outbox,
        max_in_flight: usize,
        peer: SocketAddr,
    ) -> Session {
        let handle = Arc::new(SessionHandle::new(
            a.session_id.as_str().into(),
            a.device_id.as_str().into(),
            outbox.clone(),
        ));
        Session {
            state,
            registry,
            handle,
            outbox,
            inflight: Arc::default(),
            max_in_flight,
            peer,
        }
    }

    /// The session loop. Requests run concurrently as futures of this one
    /// task (`calls`), not as tasks of their own: a request that needs no
    /// other thread (most do not) is read, run and answered without waking
    /// another worker. What is still running when the loop ends goes on in
    /// a task of its own, so that it is answered (or its approval expires)
    /// as before.
    async fn run(&mut self, stream: &mut SplitStream<Ws>, closer: &mut Closer) {
        let mut calls: FuturesUnordered<Call> = FuturesUnordered::new();
        self.state.sessions.insert(self.handle.clone());
        tracing::info!(session = %self.handle.session_id, "session started");
        self.state.approvals.on_session_start(&self.handle);
        let mut ping = tokio::time::interval_at(Instant::now() + PING_EVERY, PING_EVERY);
        // The silence timer is moved only when it fires (to the last
        // frame's time plus the limit), not at every frame.
        let mut last_frame = Instant::now();
        let silence = sleep(SILENCE_LIMIT);
        tokio::pin!(silence);
        // Made once: a fresh wait per loop would register and deregister
        // with the token at every frame.
        let (handle, state) = (self.handle.clone(), self.state.clone());
        let closed = handle.closed();
        let shutdown = state.shutdown.cancelled();
        tokio::pin!(closed, shutdown);
        loop {
            tokio::select! {
                biased;
                _ = &mut closed => {
                    let code = self.handle.close_code();
                    let reason = if code == close::REVOKED { "device revoked" } else { "closed by server" };
                    closer.close(code, reason);
                    break;
                }
                _ = &mut shutdown => {
                    let drain = async { while calls.next().await.is_some() {} };
                    let _ = timeout(DRAIN_ON_SHUTDOWN, drain).await;
                    closer.close(close::GOING_AWAY, "server shutting down");
                    break;
                }
                _ = &mut silence => {
                    let deadline = last_frame + SILENCE_LIMIT;
                    if deadline > Instant::now() {
                        silence.as_mut().reset(deadline);
                        continue;
                    }
                    closer.close(close::POLICY, "no traffic for 60 s");
                    break;
                }
                _ = ping.tick() => {
                    self.outbox.ping();
                }
                Some(()) = calls.next(), if !calls.is_empty() => {}
                msg = stream.next() => {
                    last_frame = Instant::now();
                    match msg {
                        Some(Ok(Message::Text(t))) => {
                            if let Some(call) = self.on_text(t.as_str()).await {
                                calls.push(call);
                            }
                        }
                        Some(Ok(Message::Binary(_))) => {
                            self.send(frames::error(ErrorCode::InvalidRequest, "binary frames are not accepted: send JSON in text frames")).await;
                        }
                        Some(Ok(Message::Close(_))) | None => break,
                        Some(Ok(_)) => {}
                        Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size }))) => {
                            tracing::info!(session = %self.handle.session_id, size, max_size, "frame too large");
                            closer.close(close::TOO_BIG, "frame too large");
                            break;
                        }
                        Some(Err(_)) => break,
                    }
                    // The writer runs in this task: let it write before the
                    // queue grows long (a peer that sends fast, text or
                    // binary, must not fill its own outbox).
                    if self.outbox.queued_frames() >= YIELD_TO_WRITER {
                        tokio::task::yield_now().await;
                    }
                }
            }
        }
        self.state.sessions.remove(&self.handle.session_id);
        if !calls.is_empty() {
            self.state
                .tasks
                .spawn(async move { while calls.next().await.is_some() {} });
        }
        tracing::info!(session = %self.handle.session_id, "session ended");
    }

    /// The session loop's own replies never wait: a peer that does not
    /// read them is closed as a slow consumer.
    async fn send(&self, frame: String) {
        self.outbox.push(frame);
    }

    /// Handles one text frame; a request comes back as the [`Call`] that
    /// runs it.
    async fn on_text(&self, text: &str) -> Option<Call> {
        match inbound::decode(text) {
            Inbound::Admin {
                request_id,
                action,
                params,
            } => self.call(false, request_id, Value::Null, action, params),
            Inbound::JsonRpc {
                id,
                key,
                method,
                params,
            } => self.call(true, key, id, method, params),
            Inbound::Notification => None,
            Inbound::ApprovalResponse(obj) => {
                if let Some(reply) = self.state.approvals.on_response(&self.handle, obj).await {
                    self.send(reply).await;
                }
                None
            }
            Inbound::Reply(frame) => {
                self.send(frame).await;
                None
            }
        }
    }

    /// A request admitted (budget, in-flight cap, unique id) becomes the
    /// future that runs it and queues its one response; a refused one is
    /// answered at once. `key` is the in-flight key (request_id, or the
    /// JSON-RPC id as a string).
    fn call(
        &self,
        jsonrpc: bool,
        key: String,
        id: Value,
        action: String,
        params: Map<String, Value>,
    ) -> Option<Call> {
        let respond =
            move |out: crate::rpc::ActionResult, key: &str, id: &Value| match (jsonrpc, out) {
                (false, Ok(payload)) => frames::admin_response(key, &payload),
                (false, Err(e)) => frames::admin_error(key, &e),
                (true, Ok(result)) => frames::jsonrpc_result(id, &result),
                (true, Err(e)) => frames::jsonrpc_error(id, &e),
            };
        // The device's request budget (SPEC §7 v1.1, `budget.rs`).
        if let Err(e) = self
            .state
            .budget
            .admit(&self.handle.device_id, self.registry.is_gated(&action))
        {
            self.outbox.push(respond(Err(e), &key, &id));
            return None;
        }
        if let Err(code) = self.inflight.try_insert(jsonrpc, &key, self.max_in_flight) {
            self.outbox
                .push(respond(Err(refusal(code, self.max_in_flight)), &key, &id));
            return None;
        }
        let caller = self.caller(&key);
        let (state, registry, outbox, inflight) = (
            self.state.clone(),
            self.registry.clone(),
            self.outbox.clone(),
            self.inflight.clone(),
        );
        // Every log line of the request, the approval it waits for and the
        // SQLite work it does carries the request's identity.
        let span = tracing::info_span!(
            "request",
            session = %caller.session_id,
            device = %caller.device_id,
            request_id = %key,
            action = %action,
        );
        let call = async move {
            tracing::debug!("request received");
            let out = registry.call(&state, &action, params, caller).await;
            match &out {
                Ok(_) => tracing::debug!("request answered"),
                Err(e) => tracing::debug!(code = e.code.as_str(), "request refused"),
            }
            outbox.deliver(respond(out, &key, &id)).await;
            inflight.remove(jsonrpc, &key);
        };
        Some(Box::pin(tracing::Instrument::instrument(call, span)))
    }

    fn caller(&self, request_id: &str) -> Caller {
        Caller {
            session_id: self.handle.session_id.clone(),
            device_id: self.handle.device_id.clone(),
            peer: Some(self.peer),
            request_id: request_id.into(),
        }
    }
}

fn refusal(code: ErrorCode, max: usize) -> ApiError {
    match code {
        ErrorCode::Busy => ApiError::new(
            ErrorCode::Busy,
            format!("{max} requests are already in flight on this session"),
        )
        .with_retry_after(BUSY_RETRY_MS),
        _ => ApiError::new(
            code,
            "a request with this id is still in flight on this session",
        ),
    }
}
