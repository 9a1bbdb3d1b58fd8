//! Live authenticated sessions: who is connected, and a bounded outbox to
//! reach each one (events, approval requests, forced close).
//!
//! An outbox is bounded in frames and in bytes: events and the session
//! loop's own replies never wait (a session that cannot take them is closed
//! as a slow consumer, 1013); responses may wait for room, but only while
//! what the session holds stays under a hard byte cap and for at most
//! [`RESPONSE_WAIT`]. So a peer that stops reading costs the server at most
//! [`OUTBOX_HARD_BYTES`] before it is dropped.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::protocol::close;

/// A frame queued for a connection's writer.
#[derive(Debug)]
pub enum Outbound {
    Text(String),
    Ping,
}

impl Outbound {
    fn len(&self) -> usize {
        match self {
            Outbound::Text(t) => t.len(),
            Outbound::Ping => 0,
        }
    }
}

/// Frames an outbox holds at most.
pub(crate) const OUTBOX_CAPACITY: usize = 1024;
/// Bytes queued for the writer at most (one larger frame may be queued alone).
pub(crate) const OUTBOX_BYTES: usize = 8 * 1024 * 1024;
/// Bytes queued plus bytes of responses waiting for room, at most: beyond,
/// the session is closed at once.
pub(crate) const OUTBOX_HARD_BYTES: usize = 16 * 1024 * 1024;
/// How long a response may wait for room before the session is closed.
pub(crate) const RESPONSE_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct OutboxShared {
    /// The frames, oldest first (at most [`OUTBOX_CAPACITY`]).
    frames: Mutex<std::collections::VecDeque<Outbound>>,
    /// The writer, when it waits for a frame.
    writer: futures_util::task::AtomicWaker,
    /// Live `Outbox` handles: the writer's `recv` ends once none is left.
    senders: AtomicUsize,
    queued_bytes: AtomicUsize,
    waiting_bytes: AtomicUsize,
    room: Notify,
    kill: CancellationToken,
    /// Set with `kill`, read without its lock on every frame.
    killed: std::sync::atomic::AtomicBool,
    close_code: AtomicU16,
    /// The writer is gone (set under the `frames` lock): nothing queued
    /// from now on would ever be written.
    writer_gone: std::sync::atomic::AtomicBool,
}

impl OutboxShared {
    fn close(&self, code: u16) {
        let _ = self
            .close_code
            .compare_exchange(0, code, Ordering::SeqCst, Ordering::SeqCst);
        self.killed.store(true, Ordering::SeqCst);
        self.kill.cancel();
    }
}

thread_local! {
    /// The outbox whose connection task is being polled on this thread, if
    /// any (see [`Outbox::polling_own_task`]).
    static OWN_TASK: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The sending side of a connection's outbox (cheap to clone).
#[derive(Debug)]
pub struct Outbox {
    shared: Arc<OutboxShared>,
}

impl Clone for Outbox {
    fn clone(&self) -> Outbox {
        self.shared.senders.fetch_add(1, Ordering::SeqCst);
        Outbox {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.shared.writer.wake();
        }
    }
}

/// The writer's side: frames, and the accounting it releases as it writes.
#[derive(Debug)]
pub struct OutboxReceiver {
    shared: Arc<OutboxShared>,
}

impl OutboxReceiver {
    /// The next frame; None once the outbox is empty and every `Outbox`
    /// handle is gone.
    pub async fn recv(&mut self) -> Option<Outbound> {
        std::future::poll_fn(|cx| {
            if let Some(o) = self.try_recv() {
                return std::task::Poll::Ready(Some(o));
            }
            self.shared.writer.register(cx.waker());
            match self.try_recv() {
                Some(o) => std::task::Poll::Ready(Some(o)),
                None if self.shared.senders.load(Ordering::SeqCst) == 0 => {
                    std::task::Poll::Ready(None)
                }
                None => std::task::Poll::Pending,
            }
        })
        .await
    }
    pub fn try_recv(&mut self) -> Option<Outbound> {
        self.shared
            .frames
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }
    /// The writer has written (or dropped) `o`: its bytes are free again.
    pub fn release(&self, o: &Outbound) {
        self.shared
            .queued_bytes
            .fetch_sub(o.len(), Ordering::SeqCst);
        self.shared.room.notify_waiters();
    }
}

impl Drop for OutboxReceiver {
    /// The writer has ended, so its connection is closing: the frames it
    /// did not write are freed now rather than when the last `Outbox`
    /// handle goes (a call that outlived its session may hold one for
    /// minutes), and the outbox is closed so that nothing more is kept
    /// or waited for.
    fn drop(&mut self) {
        let s = &self.shared;
        s.close(close::GOING_AWAY);
        let left = {
            let mut frames = s.frames.lock().unwrap_or_else(|p| p.into_inner());
            s.writer_gone.store(true, Ordering::SeqCst);
            std::mem::take(&mut *frames)
        };
        let bytes: usize = left.iter().map(Outbound::len).sum();
        s.queued_bytes.fetch_sub(bytes, Ordering::SeqCst);
        s.room.notify_waiters();
    }
}

/// Marks the polls of a connection task's reader half (see
/// [`Outbox::own_task`]).
#[derive(Debug, Clone, Copy)]
pub struct OwnTask(usize);

impl OwnTask {
    /// Runs `f` (one poll of the connection task's reader half) marked as
    /// the writer's own task: frames it queues do not wake the writer,
    /// which the caller polls right after. A frame queued from any other
    /// task wakes it as usual.
    pub fn enter<R>(self, f: impl FnOnce() -> R) -> R {
        struct Restore(usize);
        impl Drop for Restore {
            fn drop(&mut self) {
                OWN_TASK.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(OWN_TASK.with(|c| c.replace(self.0)));
        f()
    }
}

impl Outbox {
    pub fn new() -> (Outbox, OutboxReceiver) {
        let shared = Arc::new(OutboxShared {
            frames: Mutex::new(std::collections::VecDeque::new()),
            writer: futures_util::task::AtomicWaker::new(),
            senders: AtomicUsize::new(1),
            queued_bytes: AtomicUsize::new(0),
            waiting_bytes: AtomicUsize::new(0),
            room: Notify::new(),
            kill: CancellationToken::new(),
            killed: std::sync::atomic::AtomicBool::new(false),
            close_code: AtomicU16::new(0),
            writer_gone: std::sync::atomic::AtomicBool::new(false),
        });
        (
            Outbox {
                shared: shared.clone(),
            },
            OutboxReceiver { shared },
        )
    }

    /// The marker for the task that runs both this outbox's writer and
    /// the code that queues most of its frames.
    pub fn own_task(&self) -> OwnTask {
        OwnTask(Arc::as_ptr(&self.shared) as usize)
    }

    /// Queues `o` if it fits in the byte budget and the frame capacity.
    fn try_queue(&self, o: Outbound) -> Result<(), Outbound> {
        let len = o.len();
        let s = &self.shared;
        let prev = s.queued_bytes.fetch_add(len, Ordering::SeqCst);
        if prev > 0 && prev + len > OUTBOX_BYTES {
            s.queued_bytes.fetch_sub(len, Ordering::SeqCst);
            return Err(o);
        }
        {
            let mut frames = s.frames.lock().unwrap_or_else(|p| p.into_inner());
            if s.writer_gone.load(Ordering::SeqCst) {
                // Nobody will write it: dropped, as on a closed socket.
                drop(frames);
                s.queued_bytes.fetch_sub(len, Ordering::SeqCst);
                return Ok(());
            }
            if frames.len() >= OUTBOX_CAPACITY {
                drop(frames);
                s.queued_bytes.fetch_sub(len, Ordering::SeqCst);
                return Err(o);
            }
            frames.push_back(o);
        }
        // The writer's own task polls it right after this (see
        // `OutboxReceiver::polling_own_task`): waking it would only make
        // the runtime reschedule the task and wake another worker.
        if OWN_TASK.with(|c| c.get()) != Arc::as_ptr(s) as usize {
            s.writer.wake();
        }
        Ok(())
    }

    /// Queues a frame without waiting; a session that cannot take it is
    /// closed as a slow consumer. False if it was not queued.
    pub fn push(&self, text: String) -> bool {
        if self.is_closed() {
            return false;
        }
        match self.try_queue(Outbound::Text(text)) {
            Ok(()) => true,
            Err(_) => {
                tracing::warn!("outbox full: closing a slow session");
                self.close(close::SLOW_CONSUMER);
                false
            }
        }
    }

    /// Queues a frame if there is room; never waits and never closes (for
    /// what may be skipped, like the approval replay). False if not queued.
    pub fn try_push(&self, text: String) -> bool {
        !self.is_closed() && self.try_queue(Outbound::Text(text)).is_ok()
    }

    /// A ping, if there is room (never waits, never closes).
    pub fn ping(&self) {
        let _ = self.try_queue(Outbound::Ping);
    }

    /// Queues a response, waiting for room while the session holds less than
    /// [`OUTBOX_HARD_BYTES`] and for at most [`RESPONSE_WAIT`]; otherwise the
    /// session is closed as a slow consumer and the frame dropped.
    pub async fn deliver(&self, text: String) {
        let len = text.len();
        let mut o = Outbound::Text(text);
        let deadline = tokio::time::Instant::now() + RESPONSE_WAIT;
        let s = &self.shared;
        let mut waiting = false;
        loop {
            if self.is_closed() {
                break;
            }
            let room = s.room.notified();
            match self.try_queue(o) {
                Ok(()) => break,
                Err(back) => o = back,
            }
            if !waiting {
                let held = s.queued_bytes.load(Ordering::SeqCst)
                    + s.waiting_bytes.fetch_add(len, Ordering::SeqCst);
                waiting = true;
                if held + len > OUTBOX_HARD_BYTES {
                    tracing::warn!("a session holds too much unread data: closing it");
                    self.close(close::SLOW_CONSUMER);
                    break;
                }
            }
            tokio::select! {
                _ = room => {}
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!("response not taken in time: closing a slow session");
                    self.close(close::SLOW_CONSUMER);
                    break;
                }
                _ = s.kill.cancelled() => break,
            }
        }
        if waiting {
            s.waiting_bytes.fetch_sub(len, Ordering::SeqCst);
        }
    }

    /// Asks the connection to close with `code` (the first code wins).
    pub fn close(&self, code: u16) {
        self.shared.close(code);
    }

    pub fn is_closed(&self) -> bool {
        self.shared.killed.load(Ordering::SeqCst)
    }

    pub fn closed(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.shared.kill.cancelled()
    }

    pub fn close_code(&self) -> u16 {
        self.shared.close_code.load(Ordering::SeqCst)
    }

    /// Frames queued for the writer now.
    pub fn queued_frames(&self) -> usize {
        self.shared
            .frames
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Bytes queued for the writer now.
    pub fn queued_bytes(&self) -> usize {
        self.shared.queued_bytes.load(Ordering::SeqCst)
    }
}

/// Who is calling: reaches every handler through `Extensions`.
#[derive(Debug, Clone)]
pub struct Caller {
    pub session_id: Arc<str>,
    pub device_id: Arc<str>,
    /// The session's peer address (for `reveal_secret`: TLS or loopback only).
    pub peer: Option<std::net::SocketAddr>,
    /// The envelope `request_id`, or the JSON-RPC id rendered as a string.
    pub request_id: Arc<str>,
}

#[derive(Debug)]
pub struct SessionHandle {
    pub session_id: Arc<str>,
    pub device_id: Arc<str>,
    pub outbox: Outbox,
}

impl SessionHandle {
    pub fn new(session_id: Arc<str>, device_id: Arc<str>, outbox: Outbox) -> Self {
        SessionHandle {
            session_id,
            device_id,
            outbox,
        }
    }

    /// Asks the connection to close with `code`.
    pub fn close(&self, code: u16) {
        self.outbox.close(code);
    }

    pub fn closed(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.outbox.closed()
    }

    pub fn close_code(&self) -> u16 {
        self.outbox.close_code()
    }

    /// Queues an event; a session too slow to take it is closed (it will get
    /// pending approvals again when it reconnects).
    pub fn push_event(&self, text: String) {
        if !self.outbox.push(text) {
            tracing::debug!(session = %self.session_id, "event dropped: session closing");
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    by_id: HashMap<Arc<str>, Arc<SessionHandle>>,
    /// Live sessions per device, so `connected_devices` is O(1).
    per_device: HashMap<Arc<str>, usize>,
}

#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<Inner>,
}

impl Sessions {
    pub fn insert(&self, h: Arc<SessionHandle>) {
        let mut g = self.lock();
        *g.per_device.entry(h.device_id.clone()).or_default() += 1;
        if let Some(old) = g.by_id.insert(h.session_id.clone(), h) {
            Self::forget_device(&mut g, &old.device_id);
        }
    }

    pub fn remove(&self, session_id: &str) {
        let mut g = self.lock();
        if let Some(old) = g.by_id.remove(session_id) {
            Self::forget_device(&mut g, &old.device_id);
        }
    }

    fn forget_device(g: &mut Inner, device_id: &Arc<str>) {
        if let Some(n) = g.per_device.get_mut(device_id) {
            *n -= 1;
            if *n == 0 {
                g.per_device.remove(device_id);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn all(&self) -> Vec<Arc<SessionHandle>> {
        self.lock().by_id.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Distinct devices with a live session.
    pub fn connected_devices(&self) -> usize {
        self.lock().per_device.len()
    }

    pub fn device_ids(&self) -> Vec<String> {
        self.lock()
            .per_device
            .keys()
            .map(|d| d.to_string())
            .collect()
    }

    /// Sends `text` to every session.
    pub fn broadcast(&self, text: &str) {
        for h in self.all() {
            h.push_event(text.to_string());
        }
    }

    /// Closes every session of `device_id` with `code`; returns how many.
    pub fn close_device(&self, device_id: &str, code: u16) -> usize {
        let hs: Vec<_> = self
            .lock()
            .by_id
            .values()
            .filter(|h| &*h.device_id == device_id)
            .cloned()
            .collect();
        for h in &hs {
            h.close(code);
        }
        hs.len()
    }

    pub fn get(&self, session_id: &str) -> Option<Arc<SessionHandle>> {
        self.lock().by_id.get(session_id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(session: &str, device: &str) -> Arc<SessionHandle> {
        let (outbox, _rx) = Outbox::new();
        Arc::new(SessionHandle::new(session.into(), device.into(), outbox))
    }

    #[tokio::test(start_paused = true)]
    async fn an_outbox_is_bounded_in_bytes() {
        let (outbox, mut rx) = Outbox::new();
        let big = "x".repeat(1024 * 1024);
        for _ in 0..8 {
            assert!(outbox.push(big.clone()));
        }
        assert_eq!(outbox.queued_bytes(), OUTBOX_BYTES);
        // A response waits for room; the writer frees some.
        let o2 = outbox.clone();
        let waiter = tokio::spawn(async move { o2.deliver("y".repeat(1000)).await });
        tokio::task::yield_now().await;
        let first = rx.recv().await.unwrap();
        rx.release(&first);
        waiter.await.unwrap();
        assert!(!outbox.is_closed());
        // An event that does not fit closes the session at once.
        assert!(!outbox.push(big.clone()));
        assert!(outbox.is_closed());
        assert_eq!(outbox.close_code(), close::SLOW_CONSUMER);
    }

    #[tokio::test(start_paused = true)]
    async fn responses_beyond_the_hard_cap_close_at_once_and_waits_time_out() {
        let (outbox, _rx) = Outbox::new();
        let mb = "x".repeat(1024 * 1024);
        for _ in 0..8 {
            outbox.deliver(mb.clone()).await;
        }
        // Waiting responses count against the hard cap.
        let mut waiters = Vec::new();
        for _ in 0..7 {
            let o = outbox.clone();
            let m = mb.clone();
            waiters.push(tokio::spawn(async move { o.deliver(m).await }));
        }
        tokio::task::yield_now().await;
        assert!(!outbox.is_closed(), "15 MiB held is within the cap");
        outbox.deliver("y".repeat(2 * 1024 * 1024)).await;
        assert!(outbox.is_closed(), "17 MiB held is not");
        for w in waiters {
            w.await.unwrap();
        }
        let (slow, _rx2) = Outbox::new();
        for _ in 0..8 {
            slow.deliver(mb.clone()).await;
        }
        slow.deliver(mb.clone()).await; // waits 30 s (paused clock), then closes
        assert!(slow.is_closed());
    }

    /// The writer ends (its connection is gone) while calls that outlived
    /// the session still hold `Outbox` handles: what was queued is freed
    /// at once, not kept until the last call ends (a gated call may wait
    /// minutes for its approval), and later frames are neither kept nor
    /// waited for.
    #[tokio::test(start_paused = true)]
    async fn a_gone_writer_frees_what_was_queued_and_keeps_nothing_after() {
        let (outbox, rx) = Outbox::new();
        let left_behind = outbox.clone();
        let mb = "x".repeat(1024 * 1024);
        for _ in 0..8 {
            assert!(outbox.push(mb.clone()));
        }
        assert_eq!(outbox.queued_bytes(), OUTBOX_BYTES);
        drop(outbox);
        drop(rx);
        assert_eq!(
            (left_behind.queued_frames(), left_behind.queued_bytes()),
            (0, 0),
            "the queued frames are freed with the writer"
        );
        assert!(left_behind.is_closed());
        let answered =
            tokio::time::timeout(Duration::from_millis(100), left_behind.deliver(mb.clone())).await;
        assert!(answered.is_ok(), "a late response does not wait for room");
        assert!(!left_behind.push(mb));
        assert_eq!(
            (left_behind.queued_frames(), left_behind.queued_bytes()),
            (0, 0)
        );
    }

    /// A writer asleep in `recv` is woken by a frame pushed from another
    /// task (even one that is itself polling another outbox's own task),
    /// and `recv` ends once the last handle is dropped elsewhere. A lost
    /// wake-up would leave the receiving task asleep past the timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sleeping_writer_is_woken_by_other_tasks_and_by_the_last_drop() {
        let (outbox, mut rx) = Outbox::new();
        let (other, _other_rx) = Outbox::new();
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let writer = tokio::spawn(async move {
            while let Some(o) = rx.recv().await {
                rx.release(&o);
                if let Outbound::Text(t) = o {
                    let _ = seen_tx.send(t);
                }
            }
        });
        for i in 0..200 {
            let o = outbox.clone();
            let own = other.own_task();
            tokio::spawn(async move { own.enter(|| o.push(format!("{i}"))) })
                .await
                .unwrap();
            // Taken before the next push: each push woke the writer.
            let got = tokio::time::timeout(Duration::from_secs(2), seen.recv())
                .await
                .unwrap_or_else(|_| panic!("frame {i} did not wake the writer"));
            assert_eq!(got, Some(i.to_string()));
        }
        drop(outbox);
        tokio::time::timeout(Duration::from_secs(2), writer)
            .await
            .expect("recv ends when the last handle is dropped")
            .unwrap();
    }

    #[test]
    fn connected_devices_counts_distinct_devices() {
        let s = Sessions::default();
        s.insert(handle("s1", "a"));
        s.insert(handle("s2", "a"));
        s.insert(handle("s3", "b"));
        assert_eq!((s.len(), s.connected_devices()), (3, 2));
        s.remove("s1");
        assert_eq!(s.connected_devices(), 2);
        s.remove("s2");
        assert_eq!(s.connected_devices(), 1);
        s.remove("s2");
        assert_eq!((s.len(), s.connected_devices()), (1, 1));
        assert_eq!(s.device_ids(), vec!["b".to_string()]);
    }
}
