//! `last_seen` of devices, written in batches off the handshake path.
//!
//! A successful `auth` notes the time here (no I/O); a background task
//! writes what was noted at most [`FLUSH_AFTER`] later, in one transaction,
//! and once more at shutdown. `list_devices` flushes first, so it never
//! shows an older time than the server knows. (The `devices` CLI reads the
//! database directly, so it may lag by up to [`FLUSH_AFTER`].)

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::storage::{Db, StorageError, devices};

/// How long a noted time may wait before it is written.
pub const FLUSH_AFTER: Duration = Duration::from_secs(1);

/// Times noted and not yet written: device id → ms.
#[derive(Debug, Default)]
pub struct LastSeen {
    pending: Mutex<HashMap<String, i64>>,
    noted: Notify,
}

impl LastSeen {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, i64>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes that `device_id` was seen at `now_ms` (the latest time wins).
    pub fn note(&self, device_id: &str, now_ms: i64) {
        let mut p = self.lock();
        let first = p.is_empty();
        let t = p.entry(device_id.to_string()).or_insert(now_ms);
        *t = (*t).max(now_ms);
        drop(p);
        if first {
            self.noted.notify_one();
        }
    }

    /// Writes every noted time in one transaction.
    pub async fn flush(&self, db: &Db) -> Result<(), StorageError> {
        let batch = std::mem::take(&mut *self.lock());
        if batch.is_empty() {
            return Ok(());
        }
        db.call(move |c| {
            let tx = c.transaction()?;
            for (id, ms) in &batch {
                devices::touch_last_seen(&tx, id, *ms)?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Writes noted times [`FLUSH_AFTER`] after the first of each batch,
    /// until `shutdown`, then once more.
    pub async fn run(&self, db: Db, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = self.noted.notified() => {}
                _ = shutdown.cancelled() => break,
            }
            tokio::select! {
                _ = tokio::time::sleep(FLUSH_AFTER) => {}
                _ = shutdown.cancelled() => break,
            }
            if let Err(e) = self.flush(&db).await {
                tracing::warn!(error = %e, "cannot write devices' last_seen");
            }
        }
        if let Err(e) = self.flush(&db).await {
            tracing::warn!(error = %e, "cannot write devices' last_seen at shutdown");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_time_wins_and_flush_empties() {
        let l = LastSeen::default();
        l.note("d", 5);
        l.note("d", 3);
        l.note("e", 1);
        let p = l.lock().clone();
        assert_eq!(p.get("d"), Some(&5));
        assert_eq!(p.get("e"), Some(&1));
    }
}
