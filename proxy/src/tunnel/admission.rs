//! Fair admission before login, and per-user stream counts after it.
//!
//! **Before login** every connection holds a pre-login slot until it logs in or ends. A pool of
//! `max_unauthenticated` slots alone lets idle connections from many addresses keep it full, so
//! that real agents and clients wait seconds for a slot (measured: an agent's reconnect went from
//! 0.21 s to 7.8 s). Admission is therefore fair across sources, in the spirit of OpenSSH's
//! `MaxStartups`:
//! - one source address may hold at most `max_unauthenticated_per_source` slots;
//! - when the pool is full, a new connection is still admitted, and the connection that has waited
//!   longest from the source holding the most slots is dropped (it has had the whole handshake
//!   timeout to log in; a real client logs in within milliseconds).
//!
//! **After login** a user may hold at most `max_streams_per_user_per_target` streams to one target
//! across all its connections to this proxy, so that one user cannot take every TLS handshake
//! slot of a service (the Auth API has 256) with slow streams.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

/// The pre-login pool.
#[derive(Default)]
pub struct PreLogin {
    inner: Mutex<Pool>,
}

#[derive(Default)]
struct Pool {
    next: u64,
    /// Live pre-login connections by id.
    conns: HashMap<u64, Entry>,
    /// Pre-login connections per source address.
    by_source: HashMap<IpAddr, usize>,
}

struct Entry {
    source: IpAddr,
    since: Instant,
    /// Cancelled to drop the connection (it was chosen to make room).
    evict: CancellationToken,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Its source already holds its share of the pre-login slots.
    PerSource {
        /// The share.
        limit: usize,
    },
}

/// A connection's pre-login slot: freed when dropped (at login or when the connection ends).
pub struct Slot {
    pool: Arc<PreLogin>,
    id: u64,
    /// Cancelled when this connection is evicted to make room for a newer one.
    pub evicted: CancellationToken,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.pool.release(self.id);
    }
}

impl PreLogin {
    /// Admits a connection from `source`: a slot, plus whether an older connection was evicted to
    /// make room.
    pub fn admit(
        self: &Arc<Self>,
        source: IpAddr,
        max: usize,
        per_source: usize,
    ) -> Result<(Slot, bool), Refusal> {
        let mut p = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let held = p.by_source.get(&source).copied().unwrap_or(0);
        if held >= per_source {
            return Err(Refusal::PerSource { limit: per_source });
        }
        let mut evicted = false;
        if p.conns.len() >= max.max(1) {
            // The oldest connection of the source holding the most slots.
            let heaviest = p
                .by_source
                .iter()
                .max_by_key(|(_, n)| **n)
                .map(|(ip, _)| *ip);
            let victim = p
                .conns
                .iter()
                .filter(|(_, e)| Some(e.source) == heaviest)
                .min_by_key(|(_, e)| e.since)
                .map(|(id, _)| *id);
            if let Some(id) = victim {
                if let Some(e) = remove(&mut p, id) {
                    e.evict.cancel();
                }
                evicted = true;
            }
        }
        p.next += 1;
        let id = p.next;
        let evict = CancellationToken::new();
        p.conns.insert(
            id,
            Entry {
                source,
                since: Instant::now(),
                evict: evict.clone(),
            },
        );
        *p.by_source.entry(source).or_default() += 1;
        Ok((
            Slot {
                pool: self.clone(),
                id,
                evicted: evict,
            },
            evicted,
        ))
    }

    /// Connections holding a slot now.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .conns
            .len()
    }

    /// Whether no connection holds a slot.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn release(&self, id: u64) {
        let mut p = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        remove(&mut p, id);
    }
}

fn remove(p: &mut Pool, id: u64) -> Option<Entry> {
    let e = p.conns.remove(&id)?;
    if let Some(n) = p.by_source.get_mut(&e.source) {
        *n -= 1;
        if *n == 0 {
            p.by_source.remove(&e.source);
        }
    }
    Some(e)
}

/// Streams open per (cluster, user, target) on this proxy.
#[derive(Default)]
pub struct UserStreams {
    counts: DashMap<(String, String, String), usize>,
}

/// One counted stream; dropping it frees its place.
pub struct UserStream {
    owner: Arc<UserStreams>,
    key: (String, String, String),
}

impl UserStreams {
    /// Counts a stream of `user` to `target` of `cluster`, unless the user already holds `max`.
    pub fn take(
        self: &Arc<Self>,
        cluster: &str,
        user: &str,
        target: &str,
        max: usize,
    ) -> Option<UserStream> {
        let key = (cluster.to_owned(), user.to_owned(), target.to_owned());
        let mut n = self.counts.entry(key.clone()).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        drop(n);
        Some(UserStream {
            owner: self.clone(),
            key,
        })
    }

    /// Streams `user` holds to `target` of `cluster` now.
    pub fn count(&self, cluster: &str, user: &str, target: &str) -> usize {
        self.counts
            .get(&(cluster.to_owned(), user.to_owned(), target.to_owned()))
            .map_or(0, |n| *n)
    }
}

impl Drop for UserStream {
    fn drop(&mut self) {
        // Entries at zero are removed, so the map holds only users with open streams.
        self.owner.counts.remove_if_mut(&self.key, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, n])
    }

    #[test]
    fn a_full_pool_evicts_the_oldest_of_the_heaviest_source() {
        let pool = Arc::new(PreLogin::default());
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(pool.admit(ip(2), 4, 3).unwrap().0);
        }
        held.push(pool.admit(ip(3), 4, 3).unwrap().0);
        // Source 2 is at its share.
        assert_eq!(
            pool.admit(ip(2), 4, 3).err(),
            Some(Refusal::PerSource { limit: 3 })
        );
        // The pool is full: a newcomer gets in, and source 2's oldest goes.
        let (fresh, evicted) = pool.admit(ip(4), 4, 3).unwrap();
        assert!(evicted);
        assert!(held[0].evicted.is_cancelled());
        assert!(!held[1].evicted.is_cancelled() && !held[3].evicted.is_cancelled());
        assert_eq!(pool.len(), 4);
        drop(fresh);
        drop(held);
        assert!(pool.is_empty());
    }

    #[test]
    fn user_streams_are_bounded_and_freed() {
        let s = Arc::new(UserStreams::default());
        let a = s.take("c", "alice", "auth", 2).unwrap();
        let b = s.take("c", "alice", "auth", 2).unwrap();
        assert!(s.take("c", "alice", "auth", 2).is_none());
        assert!(s.take("c", "bob", "auth", 2).is_some());
        assert!(s.take("c", "alice", "web", 2).is_some());
        drop(a);
        assert_eq!(s.count("c", "alice", "auth"), 1);
        drop(b);
        assert_eq!(s.count("c", "alice", "auth"), 0);
        assert!(s.counts.is_empty());
    }
}
