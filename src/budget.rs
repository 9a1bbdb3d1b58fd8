//! The request budget per device (SPEC §7 v1.1): admin requests from one
//! device, all its sessions together, beyond a token bucket refilled at
//! `server.device_requests_per_sec` and holding up to
//! `server.device_request_burst` tokens get `rate_limited` with
//! `retry_after_ms` (when one token will be there). A burst of 0 turns the
//! budget off.
//!
//! A device's own flood never starves what matters most: gated actions
//! (gated ones, `Registry::is_gated`, which wait for a biometric approval and are bounded
//! by the approval limits too) draw from a second bucket of the same size,
//! and `approval_response` frames are not admin requests (never counted).
//!
//! Refusals are not audited one by one (a flood would fill the audit log
//! the budget protects): they are counted per device and written once a
//! minute as one `budget.rate_limited` record per device, outcome
//! `refused:N` ([`DeviceBudget::take_refusals`]).
//!
//! A small type rather than a crate such as `governor`: the bucket reads
//! tokio's clock, so paused-clock tests drive it like every other timer in
//! the server, and the state is two floats per device.
//!
//! Memory stays bounded: one entry per device that sent a request (devices
//! are paired by the owner), and [`DeviceBudget::forget_idle`] drops the
//! entries whose buckets are full again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::protocol::{ApiError, ErrorCode};

/// The audit record's action for the refusals of one device in a minute.
pub const RATE_LIMITED_ACTION: &str = "budget.rate_limited";

/// A token bucket on tokio's clock.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant, rate: f64, burst: f64) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
    }

    /// Takes one token, or says how long until one is there.
    fn take(&mut self, now: Instant, rate: f64, burst: f64) -> Result<(), Duration> {
        self.refill(now, rate, burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

#[derive(Debug)]
struct Device {
    general: Bucket,
    gated: Bucket,
    refused: u64,
}

/// The budgets of all devices.
#[derive(Debug)]
pub struct DeviceBudget {
    rate: f64,
    burst: f64,
    devices: Mutex<HashMap<Arc<str>, Device>>,
}

impl DeviceBudget {
    /// `burst` 0: no budget (every request admitted).
    pub fn new(per_sec: u32, burst: u32) -> DeviceBudget {
        DeviceBudget {
            rate: f64::from(per_sec.max(1)),
            burst: f64::from(burst),
            devices: Mutex::new(HashMap::new()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.burst > 0.0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Device>> {
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one admin request of `device` (`gated`: the action waits for
    /// a biometric approval, `Registry::is_gated`): Ok to run it, or the
    /// `rate_limited` error (with `retry_after_ms`) to answer instead.
    pub fn admit(&self, device: &Arc<str>, gated: bool) -> Result<(), ApiError> {
        if !self.enabled() {
            return Ok(());
        }
        let now = Instant::now();
        let (rate, burst) = (self.rate, self.burst);
        let mut devices = self.lock();
        let d = devices.entry(device.clone()).or_insert_with(|| Device {
            general: Bucket::full(burst, now),
            gated: Bucket::full(burst, now),
            refused: 0,
        });
        let bucket = if gated { &mut d.gated } else { &mut d.general };
        match bucket.take(now, rate, burst) {
            Ok(()) => Ok(()),
            Err(wait) => {
                d.refused += 1;
                let ms = (wait.as_secs_f64() * 1000.0).ceil().max(1.0) as u64;
                Err(ApiError::new(
                    ErrorCode::RateLimited,
                    format!(
                        "this device is over its request budget ({} requests/s, burst {}); retry later",
                        self.rate, self.burst
                    ),
                )
                .with_retry_after(ms))
            }
        }
    }

    /// The refusals counted since the last call, per device (for the
    /// aggregate audit record), most refused first.
    pub fn take_refusals(&self) -> Vec<(Arc<str>, u64)> {
        let mut out: Vec<(Arc<str>, u64)> = self
            .lock()
            .iter_mut()
            .filter(|(_, d)| d.refused > 0)
            .map(|(k, d)| (k.clone(), std::mem::take(&mut d.refused)))
            .collect();
        out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out
    }

    /// Drops devices whose buckets are full again and whose refusals were
    /// taken: they are as if new.
    pub fn forget_idle(&self) {
        let now = Instant::now();
        let (rate, burst) = (self.rate, self.burst);
        self.lock().retain(|_, d| {
            d.general.refill(now, rate, burst);
            d.gated.refill(now, rate, burst);
            d.refused > 0 || d.general.tokens < burst || d.gated.tokens < burst
        });
    }

    /// Devices tracked now.
    pub fn tracked(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_bucket_refills_at_the_rate_up_to_the_burst() {
        let b = DeviceBudget::new(10, 20);
        let (a, other): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        for _ in 0..20 {
            b.admit(&a, false).unwrap();
        }
        let e = b.admit(&a, false).unwrap_err();
        assert_eq!(e.code, ErrorCode::RateLimited);
        assert_eq!(e.retry_after_ms, Some(100), "one token every 100 ms");
        // Another device and the gated bucket are untouched.
        b.admit(&other, false).unwrap();
        b.admit(&a, true).unwrap();
        tokio::time::advance(Duration::from_millis(100)).await;
        b.admit(&a, false).unwrap();
        assert!(b.admit(&a, false).is_err());
        // A long pause refills to the burst, never beyond.
        tokio::time::advance(Duration::from_secs(3600)).await;
        for _ in 0..20 {
            b.admit(&a, false).unwrap();
        }
        assert!(b.admit(&a, false).is_err());
        assert_eq!(b.take_refusals(), vec![(a.clone(), 3)]);
        assert_eq!(b.take_refusals(), vec![]);
        tokio::time::advance(Duration::from_secs(10)).await;
        b.forget_idle();
        assert_eq!(b.tracked(), 0, "full buckets are forgotten");
    }

    #[tokio::test]
    async fn burst_zero_turns_the_budget_off() {
        let b = DeviceBudget::new(1, 0);
        let a: Arc<str> = "a".into();
        for _ in 0..10_000 {
            b.admit(&a, false).unwrap();
        }
        assert_eq!(b.tracked(), 0);
    }
}
