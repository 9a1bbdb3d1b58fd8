//! Live authenticated sessions: who is connected, and a bounded outbox to
//! reach each one (events, approval requests, forced close).

use std::collections::HashMap;
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
        let (tx, _rx) = mpsc::channel(1);
        Arc::new(SessionHandle::new(session.into(), device.into(), tx))
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
