//! Rate limits for failed handshakes (SPEC §4): a sliding one-minute window
//! of failures per peer, and one for failed pairings from everyone; plus the
//! per-peer tally of failures that is audited once a minute in aggregate.
//!
//! A sliding-window log is used rather than a token bucket because the
//! contract is stated as "more than N failures in the last minute", and
//! `retry_after_ms` must say when that stops being true. Refusals are not
//! counted.
//!
//! Cost and memory stay bounded whatever the number of peers: logs live in
//! two generations of maps, `current` and `previous`; a log touched is moved
//! to `current`, and once a minute `previous` is dropped whole — everything
//! in it was last touched over a minute ago, so all of its failures have
//! left the window. No operation sweeps the table (each log is dropped once:
//! O(1) amortised), each log keeps at most limit + 1 entries, and at most
//! [`MAX_TRACKED`] peers are tracked (further new peers are not limited
//! individually until room frees; they never affect tracked peers, and the
//! global pairing window still holds them).
//!
//! Peers are keyed by [`peer_key`]: an IPv4 address (an IPv4-mapped IPv6
//! address counts as its IPv4 address), or an IPv6 /64, the block one
//! subscriber usually holds.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

const WINDOW: Duration = Duration::from_secs(60);
/// Peers whose failure logs are kept at once.
pub const MAX_TRACKED: usize = 65_536;
/// Peers tallied for the aggregate audit between two reports; failures of
/// further peers are summed in one "other peers" count.
pub const MAX_REPORTED: usize = 4_096;

/// The key a peer address is limited and counted by.
pub fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mask = !0u128 << 64;
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        },
    }
}

pub struct HandshakeLimiter {
    per_peer: usize,
    pair_global: usize,
    inner: Mutex<Inner>,
}

/// Failures of one peer since the last report.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub count: u64,
    /// (auth_error code, count), in first-seen order.
    pub codes: Vec<(&'static str, u64)>,
}

/// What [`HandshakeLimiter::take_report`] returns.
#[derive(Debug, Default)]
pub struct Report {
    pub peers: Vec<(IpAddr, Tally)>,
    /// Failures of peers beyond [`MAX_REPORTED`].
    pub other_failures: u64,
}

type Logs = HashMap<IpAddr, VecDeque<Instant>>;

struct Inner {
    rotated_at: Instant,
    current: Logs,
    previous: Logs,
    pairs: VecDeque<Instant>,
    tally: HashMap<IpAddr, Tally>,
    other_failures: u64,
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

impl Inner {
    /// Starts a new generation once a minute; returns what to drop (outside
    /// the lock).
    fn rotate(&mut self, now: Instant) -> Option<(Logs, Logs)> {
        let elapsed = now.duration_since(self.rotated_at);
        if elapsed < WINDOW {
            return None;
        }
        self.rotated_at = now;
        let current = std::mem::take(&mut self.current);
        if elapsed >= 2 * WINDOW {
            // Nothing was touched for a whole window: everything is stale.
            Some((current, std::mem::take(&mut self.previous)))
        } else {
            Some((std::mem::replace(&mut self.previous, current), Logs::new()))
        }
    }

    /// The log of `key`, moved into the current generation.
    fn log(&mut self, key: IpAddr) -> Option<&mut VecDeque<Instant>> {
        if !self.current.contains_key(&key) {
            let log = self.previous.remove(&key)?;
            self.current.insert(key, log);
        }
        self.current.get_mut(&key)
    }
}

impl HandshakeLimiter {
    /// `0` disables a limit.
    pub fn new(per_peer_per_minute: u32, pair_failures_per_minute: u32) -> Self {
        HandshakeLimiter {
            per_peer: per_peer_per_minute as usize,
            pair_global: pair_failures_per_minute as usize,
            inner: Mutex::new(Inner {
                rotated_at: Instant::now(),
                current: Logs::new(),
                previous: Logs::new(),
                pairs: VecDeque::new(),
                tally: HashMap::new(),
                other_failures: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Err(retry_after_ms)` if `peer` had more than the allowed failures in
    /// the last minute.
    pub fn check_peer(&self, peer: IpAddr) -> Result<(), u64> {
        if self.per_peer == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut g = self.lock();
        let stale = g.rotate(now);
        let verdict = match g.log(peer_key(peer)) {
            None => Ok(()),
            Some(log) => {
                prune(log, now);
                if log.len() > self.per_peer {
                    Err(retry_after(log, log.len() - self.per_peer - 1, now))
                } else {
                    Ok(())
                }
            }
        };
        drop(g);
        drop(stale);
        verdict
    }

    /// `Err(retry_after_ms)` while failed pairings from everyone fill the window.
    pub fn check_pairing(&self) -> Result<(), u64> {
        if self.pair_global == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut g = self.lock();
        prune(&mut g.pairs, now);
        if g.pairs.len() >= self.pair_global {
            Err(retry_after(&g.pairs, g.pairs.len() - self.pair_global, now))
        } else {
            Ok(())
        }
    }

    /// Counts a failed handshake from `peer` with auth_error `code`
    /// (`pairing`: it was a pairing attempt).
    pub fn record_failure(&self, peer: IpAddr, pairing: bool, code: &'static str) {
        let now = Instant::now();
        let key = peer_key(peer);
        let mut g = self.lock();
        let stale = g.rotate(now);
        if self.per_peer > 0 {
            let cap = self.per_peer + 1;
            let tracked = g.current.len() + g.previous.len();
            match g.log(key) {
                Some(log) => {
                    prune(log, now);
                    log.push_back(now);
                    while log.len() > cap {
                        log.pop_front();
                    }
                }
                None if tracked < MAX_TRACKED => {
                    g.current.insert(key, VecDeque::from([now]));
                }
                None => {}
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
        let room = g.tally.len() < MAX_REPORTED;
        match g.tally.get_mut(&key) {
            Some(t) => t.add(code),
            None if room => g.tally.entry(key).or_default().add(code),
            None => g.other_failures += 1,
        }
        drop(g);
        drop(stale);
    }

    /// The failures tallied since the last call, for the aggregate audit.
    pub fn take_report(&self) -> Report {
        let mut g = self.lock();
        let tally = std::mem::take(&mut g.tally);
        let other_failures = std::mem::take(&mut g.other_failures);
        drop(g);
        let mut peers: Vec<_> = tally.into_iter().collect();
        peers.sort_by_key(|(ip, _)| *ip);
        Report {
            peers,
            other_failures,
        }
    }

    /// Peers whose logs are held (for tests of the memory bound).
    pub fn tracked(&self) -> usize {
        let g = self.lock();
        g.current.len() + g.previous.len()
    }
}

impl Tally {
    fn add(&mut self, code: &'static str) {
        self.count += 1;
        match self.codes.iter_mut().find(|(c, _)| *c == code) {
            Some((_, n)) => *n += 1,
            None => self.codes.push((code, 1)),
        }
    }

    /// e.g. `bad_signature:3,invalid_code:2`.
    pub fn codes_text(&self) -> String {
        self.codes
            .iter()
            .map(|(c, n)| format!("{c}:{n}"))
            .collect::<Vec<_>>()
            .join(",")
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
            l.record_failure(a, false, "bad_signature");
            assert!(l.check_peer(a).is_ok());
        }
        l.record_failure(a, false, "bad_signature");
        let retry = l.check_peer(a).unwrap_err();
        assert!(retry > 59_000 && retry <= 60_000, "{retry}");
        assert!(l.check_peer(b).is_ok(), "other peers are not affected");
        tokio::time::advance(Duration::from_millis(retry)).await;
        assert!(l.check_peer(a).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_slides_across_generations() {
        // Failures spread over a rotation still count together.
        let l = HandshakeLimiter::new(3, 100);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        tokio::time::advance(Duration::from_secs(50)).await;
        l.record_failure(a, false, "x");
        l.record_failure(a, false, "x");
        tokio::time::advance(Duration::from_secs(20)).await; // rotation at 60 s
        l.record_failure(a, false, "x");
        l.record_failure(a, false, "x");
        assert!(l.check_peer(a).is_err(), "4 failures within 20 s");
        tokio::time::advance(Duration::from_secs(45)).await; // 65 s after the first two
        assert!(l.check_peer(a).is_ok(), "the first two left the window");
        tokio::time::advance(Duration::from_secs(200)).await;
        assert!(l.check_peer(a).is_ok());
        l.check_peer("10.9.9.9".parse().unwrap()).unwrap();
        assert_eq!(l.tracked(), 0, "stale logs are dropped whole");
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_bounded_and_tracked_peers_keep_their_limit() {
        let l = HandshakeLimiter::new(2, 0);
        let victim: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..3 {
            l.record_failure(victim, false, "x");
        }
        for i in 0..(MAX_TRACKED as u32 + 1000) {
            l.record_failure(IpAddr::V4((0x0b00_0000 + i).into()), false, "x");
        }
        assert!(l.tracked() <= MAX_TRACKED);
        assert!(
            l.check_peer(victim).is_err(),
            "a flood of new peers frees no one"
        );
        let r = l.take_report();
        assert_eq!(r.peers.len(), MAX_REPORTED);
        assert_eq!(
            r.peers.iter().map(|(_, t)| t.count).sum::<u64>() + r.other_failures,
            MAX_TRACKED as u64 + 1003
        );
        assert!(l.take_report().peers.is_empty(), "a report is taken once");
    }

    #[test]
    fn peers_are_keyed_by_ipv4_or_ipv6_slash_64() {
        let k = |s: &str| peer_key(s.parse().unwrap());
        assert_eq!(k("::ffff:127.0.0.5"), k("127.0.0.5"));
        assert_eq!(k("2001:db8:1:2:aaaa::1"), k("2001:db8:1:2:bbbb::9"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
    }

    #[tokio::test(start_paused = true)]
    async fn global_pairing_window() {
        let l = HandshakeLimiter::new(0, 2);
        l.record_failure("10.0.0.1".parse().unwrap(), true, "invalid_code");
        assert!(l.check_pairing().is_ok());
        l.record_failure("10.0.0.2".parse().unwrap(), true, "invalid_code");
        assert!(l.check_pairing().is_err());
        tokio::time::advance(WINDOW).await;
        assert!(l.check_pairing().is_ok());
    }
}
