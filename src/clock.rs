//! Wall-clock time as the server sees it: the system clock, plus whatever
//! tokio's clock was moved by hand.
//!
//! `now_ms` reads the system wall clock on every call, so expiries (pairing
//! codes, approvals) follow the real time through suspend and NTP steps; a
//! clock anchored once at start would drift from it. Tests that pause and
//! advance tokio's clock still move expiries: the time tokio's clock has
//! been advanced beyond the real monotonic clock is added (it is zero in
//! production, where the two run together).

use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{DateTime, SecondsFormat, Utc};
use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// tokio's clock and the real monotonic clock at creation.
    tokio_base: Instant,
    real_base: std::time::Instant,
    /// The wall clock source (the system's; a fake one in unit tests).
    wall: fn() -> i64,
}

impl Default for Clock {
    fn default() -> Clock {
        Clock::new()
    }
}

impl Clock {
    /// Must be created inside a tokio runtime.
    pub fn new() -> Clock {
        Clock::with_wall(system_now_ms)
    }

    fn with_wall(wall: fn() -> i64) -> Clock {
        Clock {
            tokio_base: Instant::now(),
            real_base: std::time::Instant::now(),
            wall,
        }
    }

    /// How far tokio's clock was moved ahead of real time (paused-clock tests).
    fn skew_ms(&self) -> i64 {
        let tokio = self.tokio_base.elapsed().as_millis() as i64;
        let real = self.real_base.elapsed().as_millis() as i64;
        (tokio - real).max(0)
    }

    /// Unix milliseconds.
    pub fn now_ms(&self) -> i64 {
        (self.wall)() + self.skew_ms()
    }

    pub fn now_rfc3339(&self) -> String {
        rfc3339_ms(self.now_ms())
    }

    /// The tokio instant at which wall time `ms` is reached (if the wall
    /// clock is not stepped meanwhile).
    pub fn instant_at(&self, ms: i64) -> Instant {
        let delta = (ms - self.now_ms()).max(0) as u64;
        Instant::now() + std::time::Duration::from_millis(delta)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};

    static FAKE_WALL: AtomicI64 = AtomicI64::new(1_000_000);
    fn fake_wall() -> i64 {
        FAKE_WALL.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn follows_a_stepped_wall_clock() {
        // A suspend or an NTP step moves the system clock by an hour while
        // the monotonic clocks stand still: expiries must see the new time.
        let c = Clock::with_wall(fake_wall);
        let before = c.now_ms();
        FAKE_WALL.fetch_add(3_600_000, Ordering::SeqCst);
        let after = c.now_ms();
        assert!(
            (3_600_000..3_601_000).contains(&(after - before)),
            "{before} -> {after}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn paused_tokio_clock_moves_wall_time() {
        let c = Clock::new();
        let before = c.now_ms();
        tokio::time::advance(std::time::Duration::from_secs(301)).await;
        let moved = c.now_ms() - before;
        assert!((301_000..302_000).contains(&moved), "{moved}");
        assert!(c.instant_at(c.now_ms() + 5_000) >= Instant::now());
    }

    #[tokio::test]
    async fn real_time_matches_the_system_clock() {
        let c = Clock::new();
        assert!((c.now_ms() - system_now_ms()).abs() < 50);
    }
}
