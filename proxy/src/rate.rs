//! Per-key rate limits and failure counts, both bounded in memory whatever keys arrive.
//!
//! - [`RateLimit`]: "at most N per minute per key" for the login relay (per source address, per
//!   user and source address) and for new tunnel-listener connections per source address. It is
//!   `governor`'s keyed GCRA limiter: N at once, then one more every minute / N.
//! - [`FailureCount`]: failed logins per key in a fixed one-minute window, kept by hand. A failure
//!   count is not a rate limit: failures are *recorded* after a refusal and *read* before the
//!   next attempt without spending anything, and `governor` has no way to read a key's state
//!   without consuming a cell.
//!
//! Both hold at most [`MAX_KEYS`] keys: stale keys are pruned at least once a window (and
//! whenever the table is full), and while it is full of live keys a new key is refused by a
//! [`RateLimit`] and not counted by a [`FailureCount`].

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use governor::clock::DefaultClock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::{InMemoryState, StateStore};
use governor::{Quota, RateLimiter};

/// Keys a [`RateLimit`] or [`FailureCount`] tracks at most.
pub const MAX_KEYS: usize = 100_000;

/// The limiter's state: governor's own `DashMap` store, shared so that [`RateLimit`] can tell a
/// new key from a known one when the table is full (governor inserts any key it checks).
#[derive(Clone, Default)]
struct Store(Arc<DashMap<String, InMemoryState>>);

impl StateStore for Store {
    type Key = String;

    fn measure_and_replace<T, F, E>(&self, key: &String, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure_and_replace(key, f)
    }
}

impl ShrinkableKeyedStateStore<String> for Store {
    fn retain_recent(&self, drop_below: Nanos) {
        ShrinkableKeyedStateStore::retain_recent(&*self.0, drop_below);
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// At most `n` attempts per key per window (a minute in production): `governor`'s keyed GCRA
/// limiter, a burst of `n` and then one attempt every window / `n`.
pub struct RateLimit {
    limiter: RateLimiter<
        String,
        Store,
        DefaultClock,
        NoOpMiddleware<<DefaultClock as governor::clock::Clock>::Instant>,
    >,
    /// The same table the limiter writes, read to tell new keys from known ones.
    store: Store,
    window: Duration,
    /// When stale keys were last pruned.
    pruned: Mutex<Instant>,
}

impl RateLimit {
    /// At most `n` per minute per key; `n` = 0 refuses everything.
    pub fn per_minute(n: u32) -> RateLimit {
        RateLimit::new(n, Duration::from_secs(60))
    }

    /// At most `n` per `window` per key; `n` = 0 refuses everything.
    pub fn new(n: u32, window: Duration) -> RateLimit {
        let burst = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        let period = (window / burst.get()).max(Duration::from_nanos(1));
        let quota = Quota::with_period(period)
            .expect("a non-zero period")
            .allow_burst(burst);
        let store = Store::default();
        RateLimit {
            limiter: RateLimiter::new(quota, store.clone(), DefaultClock::default()),
            store,
            window: if n == 0 { Duration::ZERO } else { window },
            pruned: Mutex::new(Instant::now()),
        }
    }

    /// Counts an attempt for `key`; false once its budget is spent.
    pub fn allow(&self, key: &str) -> bool {
        if self.window.is_zero() {
            return false;
        }
        {
            let mut pruned = self.pruned.lock().unwrap_or_else(|p| p.into_inner());
            if pruned.elapsed() >= self.window || self.limiter.len() >= MAX_KEYS {
                self.limiter.retain_recent();
                *pruned = Instant::now();
            }
        }
        if self.limiter.len() >= MAX_KEYS && !self.store.0.contains_key(key) {
            return false;
        }
        self.limiter.check_key(&key.to_owned()).is_ok()
    }

    /// Keys held now (stale ones included until the next prune).
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

/// Per key: when its window began, and the failures counted in it.
type Windows = HashMap<String, (Instant, u32)>;

/// Failures per key in fixed windows (a minute in production), kept by hand: see the module
/// documentation for why this is not a [`RateLimit`].
pub struct FailureCount {
    /// Window start and count per key, and when expired windows were last pruned.
    map: Mutex<(Windows, Instant)>,
    window: Duration,
}

impl Default for FailureCount {
    fn default() -> Self {
        FailureCount::with_window(Duration::from_secs(60))
    }
}

impl FailureCount {
    /// Counts in windows of `window`.
    pub fn with_window(window: Duration) -> FailureCount {
        FailureCount {
            map: Mutex::new((HashMap::new(), Instant::now())),
            window,
        }
    }

    /// Records one failure for `key`.
    pub fn record(&self, key: &str) {
        let mut guard = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let (m, pruned) = &mut *guard;
        let window = self.window;
        if pruned.elapsed() >= window || m.len() >= MAX_KEYS {
            m.retain(|_, (since, _)| since.elapsed() < window);
            *pruned = Instant::now();
        }
        if m.len() >= MAX_KEYS && !m.contains_key(key) {
            return;
        }
        let e = m.entry(key.to_string()).or_insert((Instant::now(), 0));
        if e.0.elapsed() >= window {
            *e = (Instant::now(), 0);
        }
        e.1 = e.1.saturating_add(1);
    }

    /// Failures recorded for `key` in the current window.
    pub fn count(&self, key: &str) -> u32 {
        let guard = self.map.lock().unwrap_or_else(|p| p.into_inner());
        guard
            .0
            .get(key)
            .filter(|(since, _)| since.elapsed() < self.window)
            .map_or(0, |(_, n)| *n)
    }

    /// Keys held now (expired ones included until the next prune).
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).0.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_holds_per_key_and_stale_keys_are_pruned() {
        let l = RateLimit::new(2, Duration::from_millis(100));
        assert!(l.allow("a") && l.allow("a"));
        assert!(!l.allow("a"), "over the limit within the window");
        assert!(l.allow("b"), "another key has its own budget");
        for i in 0..1000 {
            assert!(l.allow(&format!("user{i}")));
        }
        assert_eq!(l.len(), 1002);
        std::thread::sleep(Duration::from_millis(250));
        assert!(l.allow("late"));
        assert_eq!(l.len(), 1, "stale keys are pruned");
        assert!(l.allow("a"), "the budget came back");
    }

    #[test]
    fn zero_refuses_everything() {
        assert!(!RateLimit::per_minute(0).allow("a"));
    }

    #[test]
    fn expired_failure_windows_are_pruned() {
        let f = FailureCount::with_window(Duration::from_millis(50));
        for i in 0..1000 {
            f.record(&format!("user{i}"));
        }
        f.record("user0");
        assert_eq!(f.count("user0"), 2);
        assert_eq!(f.len(), 1000);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(f.count("user0"), 0, "the window ended");
        f.record("late");
        assert_eq!(f.len(), 1, "expired windows are pruned");
    }
}
