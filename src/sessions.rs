//! Live authenticated sessions: who is connected, and a bounded outbox to
//! reach each one (events, approval requests, forced close).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU16, Ordering};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::protocol::close;

/// A frame queued for a connection's writer.
#[derive(Debug)]
pub enum Outbound {
    Text(String),
    Ping,
}

/// Capacity of each connection's outbox. Responses wait for room; events
/// that find it full close the session instead of growing memory.
pub const OUTBOX_CAPACITY: usize = 1024;

#[derive(Debug)]
pub struct SessionHandle {
    pub session_id: Arc<str>,
    pub device_id: Arc<str>,
    pub outbox: mpsc::Sender<Outbound>,
    kill: CancellationToken,
    close_code: AtomicU16,
}

impl SessionHandle {
    pub fn new(session_id: Arc<str>, device_id: Arc<str>, outbox: mpsc::Sender<Outbound>) -> Self {
        SessionHandle {
            session_id,
            device_id,
            outbox,
            kill: CancellationToken::new(),
            close_code: AtomicU16::new(0),
        }
    }

    /// Asks the connection to close with `code`.
    pub fn close(&self, code: u16) {
        let _ = self
            .close_code
            .compare_exchange(0, code, Ordering::SeqCst, Ordering::SeqCst);
        self.kill.cancel();
    }

    pub fn closed(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.kill.cancelled()
    }

    pub fn close_code(&self) -> u16 {
        self.close_code.load(Ordering::SeqCst)
    }

    /// Queues an event; a session too slow to take it is closed (it will get
    /// pending approvals again when it reconnects).
    pub fn push_event(&self, text: String) {
        if self.outbox.try_send(Outbound::Text(text)).is_err() {
            tracing::warn!(session = %self.session_id, "outbox full: closing slow session");
            self.close(close::SLOW_CONSUMER);
        }
    }
}

#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<Arc<str>, Arc<SessionHandle>>>,
}

impl Sessions {
    pub fn insert(&self, h: Arc<SessionHandle>) {
        self.lock().insert(h.session_id.clone(), h);
    }

    pub fn remove(&self, session_id: &str) {
        self.lock().remove(session_id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<SessionHandle>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn all(&self) -> Vec<Arc<SessionHandle>> {
        self.lock().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Distinct devices with a live session.
    pub fn connected_devices(&self) -> usize {
        self.lock()
            .values()
            .map(|h| h.device_id.clone())
            .collect::<HashSet<_>>()
            .len()
    }

    pub fn device_ids(&self) -> Vec<String> {
        self.lock()
            .values()
            .map(|h| h.device_id.to_string())
            .collect::<HashSet<_>>()
            .into_iter()
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
        self.lock().get(session_id).cloned()
    }
}
