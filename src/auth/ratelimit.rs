//! Rate limits for failed handshakes (SPEC §4): a sliding one-minute window
//! of failures per peer address, and one for failed pairings from everyone.
//!
//! A sliding-window log is used rather than a token bucket (e.g. `governor`)
//! because the contract is stated as "more than N failures in the last
//! minute", and `retry_after_ms` must say when that stops being true.
//! Refusals are not counted. Memory is bounded: each log keeps at most
//! limit + 1 entries, and idle peers are swept.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

const WINDOW: Duration = Duration::from_secs(60);
const SWEEP_AT: usize = 4096;

pub struct HandshakeLimiter {
    per_peer: usize,
    pair_global: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    peers: HashMap<IpAddr, VecDeque<Instant>>,
    pairs: VecDeque<Instant>,
}

fn prune(log: &mut VecDeque<Instant>, now: Instant) {
    while log
        .front()
        .is_some_and(|t| now.duration_since(*t) >= WINDOW)
    {
        log.pop_front();
    }
}

/// Milliseconds until the entry at `idx` leaves the window.
fn retry_after(log: &VecDeque<Instant>, idx: usize, now: Instant) -> u64 {
    log.get(idx)
        .map(|t| (*t + WINDOW).saturating_duration_since(now).as_millis() as u64)
        .unwrap_or(0)
        .max(1)
}

impl HandshakeLimiter {
    /// `0` disables a limit.
    pub fn new(per_peer_per_minute: u32, pair_failures_per_minute: u32) -> Self {
        HandshakeLimiter {
            per_peer: per_peer_per_minute as usize,
            pair_global: pair_failures_per_minute as usize,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// `Err(retry_after_ms)` if `peer` had more than the allowed failures in
    /// the last minute.
    pub fn check_peer(&self, peer: IpAddr) -> Result<(), u64> {
        if self.per_peer == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(log) = g.peers.get_mut(&peer) else {
            return Ok(());
        };
        prune(log, now);
        if log.len() > self.per_peer {
            Err(retry_after(log, log.len() - self.per_peer - 1, now))
        } else {
            Ok(())
        }
    }

    /// `Err(retry_after_ms)` while failed pairings from everyone fill the window.
    pub fn check_pairing(&self) -> Result<(), u64> {
        if self.pair_global == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        prune(&mut g.pairs, now);
        if g.pairs.len() >= self.pair_global {
            Err(retry_after(&g.pairs, g.pairs.len() - self.pair_global, now))
        } else {
            Ok(())
        }
    }

    /// Counts a failed handshake from `peer` (`pairing`: it was a pairing attempt).
    pub fn record_failure(&self, peer: IpAddr, pairing: bool) {
        let now = Instant::now();
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.peers.len() >= SWEEP_AT {
            g.peers.retain(|_, log| {
                prune(log, now);
                !log.is_empty()
            });
        }
        if self.per_peer > 0 {
            let cap = self.per_peer + 1;
            let log = g.peers.entry(peer).or_default();
            prune(log, now);
            log.push_back(now);
            while log.len() > cap {
                log.pop_front();
            }
        }
        if pairing && self.pair_global > 0 {
            let cap = self.pair_global;
            prune(&mut g.pairs, now);
            g.pairs.push_back(now);
            while g.pairs.len() > cap {
                g.pairs.pop_front();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn peer_window_slides() {
        let l = HandshakeLimiter::new(3, 100);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            l.record_failure(a, false);
            assert!(l.check_peer(a).is_ok());
        }
        l.record_failure(a, false);
        let retry = l.check_peer(a).unwrap_err();
        assert!(retry > 59_000 && retry <= 60_000, "{retry}");
        assert!(l.check_peer(b).is_ok(), "other peers are not affected");
        tokio::time::advance(Duration::from_millis(retry)).await;
        assert!(l.check_peer(a).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn global_pairing_window() {
        let l = HandshakeLimiter::new(0, 2);
        l.record_failure("10.0.0.1".parse().unwrap(), true);
        assert!(l.check_pairing().is_ok());
        l.record_failure("10.0.0.2".parse().unwrap(), true);
        assert!(l.check_pairing().is_err());
        tokio::time::advance(WINDOW).await;
        assert!(l.check_pairing().is_ok());
    }
}
