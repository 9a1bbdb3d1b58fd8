//! Admission of unauthenticated connections (SPEC §4 v1.1): idle or slow
//! peers cannot keep the owner out.
//!
//! A connection holds a [`Ticket`] from accept until its handshake succeeds
//! (or it ends). At most `per_peer` tickets per peer (an IPv4 address, or
//! an IPv6 /64: [`peer_key`]) — more are closed at once — and at most
//! `total` in all: when full, the oldest unauthenticated connection is
//! evicted to make room for the new one. So a flood of idle sockets from
//! one address is cut at `per_peer`, and one from many addresses can only
//! hold a slot until newer connections push it out; every eviction and
//! every handshake timeout counts as a failed handshake of that peer, so
//! an address that keeps doing it is soon rate limited.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::auth::ratelimit::peer_key;

/// Unauthenticated connections per peer.
pub const PER_PEER: usize = 32;

pub struct Admission {
    per_peer: usize,
    total: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    per_peer: HashMap<IpAddr, usize>,
    /// Tickets by age (ids grow), with the token that evicts each.
    order: BTreeMap<u64, (IpAddr, CancellationToken)>,
}

impl Inner {
    fn forget(&mut self, id: u64) -> Option<(IpAddr, CancellationToken)> {
        let (key, token) = self.order.remove(&id)?;
        if let Some(n) = self.per_peer.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.per_peer.remove(&key);
            }
        }
        Some((key, token))
    }
}

/// An unauthenticated connection's place; released on drop.
pub struct Ticket {
    admission: Arc<Admission>,
    id: u64,
    /// Cancelled when the connection is evicted to make room.
    pub evicted: CancellationToken,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut g = self.admission.lock();
        g.forget(self.id);
    }
}

impl Admission {
    pub fn new(per_peer: usize, total: usize) -> Arc<Admission> {
        Arc::new(Admission {
            per_peer: per_peer.max(1),
            total: total.max(1),
            inner: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A ticket for a new connection from `peer`, or None if that peer
    /// already holds its share.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<Ticket> {
        let key = peer_key(peer);
        let mut g = self.lock();
        if g.per_peer.get(&key).copied().unwrap_or(0) >= self.per_peer {
            return None;
        }
        if g.order.len() >= self.total
            && let Some(oldest) = g.order.keys().next().copied()
            && let Some((_, token)) = g.forget(oldest)
        {
            token.cancel();
        }
        let id = g.next_id;
        g.next_id += 1;
        let evicted = CancellationToken::new();
        *g.per_peer.entry(key).or_default() += 1;
        g.order.insert(id, (key, evicted.clone()));
        drop(g);
        Some(Ticket {
            admission: self.clone(),
            id,
            evicted,
        })
    }

    /// Unauthenticated connections now.
    pub fn len(&self) -> usize {
        self.lock().order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn total(&self) -> usize {
        self.total
    }
}

/// Raises the soft open-file limit to the hard one and returns how many
/// connections the server can hold, leaving room for its own files.
pub fn connection_capacity() -> usize {
    const RESERVE: u64 = 256;
    const MAX: u64 = 20_000;
    let soft = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024);
    let cap = soft.saturating_sub(RESERVE).clamp(16, MAX) as usize;
    tracing::debug!(open_files = soft, connections = cap, "connection capacity");
    cap
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_peer_cap_and_release() {
        let a = Admission::new(2, 100);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t1 = a.admit(ip).unwrap();
        let _t2 = a.admit(ip).unwrap();
        assert!(a.admit(ip).is_none());
        assert!(
            a.admit("::ffff:10.0.0.1".parse().unwrap()).is_none(),
            "mapped = v4"
        );
        assert!(a.admit("10.0.0.2".parse().unwrap()).is_some());
        drop(t1);
        assert!(a.admit(ip).is_some());
    }

    #[test]
    fn when_full_the_oldest_is_evicted() {
        let a = Admission::new(10, 3);
        let ts: Vec<_> = (1..=3)
            .map(|i| a.admit(IpAddr::from([10, 0, 0, i])).unwrap())
            .collect();
        let newest = a.admit("10.0.0.9".parse().unwrap()).unwrap();
        assert!(ts[0].evicted.is_cancelled());
        assert!(!ts[1].evicted.is_cancelled() && !newest.evicted.is_cancelled());
        assert_eq!(a.len(), 3);
        drop(ts);
        assert_eq!(
            a.len(),
            1,
            "dropping an evicted ticket releases nothing twice"
        );
    }
}
