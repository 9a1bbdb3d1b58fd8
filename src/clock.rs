//! Wall-clock time as the server sees it, driven by tokio's clock.
//!
//! The wall time is anchored once at start and then advanced by
//! `tokio::time::Instant`, so tests that pause and advance tokio's clock also
//! move pairing-code and approval expiries, without sleeping.

use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{DateTime, SecondsFormat, Utc};
use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base_ms: i64,
    base: Instant,
}

impl Default for Clock {
    fn default() -> Clock {
        Clock::new()
    }
}

impl Clock {
    /// Must be created inside a tokio runtime.
    pub fn new() -> Clock {
        Clock {
            base_ms: system_now_ms(),
            base: Instant::now(),
        }
    }

    /// Unix milliseconds.
    pub fn now_ms(&self) -> i64 {
        self.base_ms + self.base.elapsed().as_millis() as i64
    }

    pub fn now_rfc3339(&self) -> String {
        rfc3339_ms(self.now_ms())
    }

    /// The tokio instant at which wall time `ms` is reached.
    pub fn instant_at(&self, ms: i64) -> Instant {
        let delta = (ms - self.base_ms).max(0) as u64;
        self.base + std::time::Duration::from_millis(delta)
    }
}

/// Unix milliseconds from the system clock (for the CLI, outside the server).
pub fn system_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// RFC 3339 UTC with millisecond precision, e.g. `2026-11-24T01:02:03.456Z`.
pub fn rfc3339_ms(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}
