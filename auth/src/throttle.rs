//! Login throttling: the password-hashing gate (bounded concurrency, a bounded queue with a
//! deadline, a "busy, retry" answer) and failed logins counted per source address and user.
//!
//! Failures are counted per (source address, user), never per user alone: a stranger who
//! guesses wrong five times locks only their own address out of that user, and the owner logs in
//! from anywhere else. The proxy's relay limits (30 logins a minute per address, 10 per user
//! per address) bound the rate from each address; many addresses guess faster, at one Argon2
//! hash per core at a time at most. Both maps here are bounded: entries expire with their window and are
//! pruned at least once a window, and at most [`MAX_TRACKED`] are kept.
//!
//! [`Failures`] is kept by hand, not `governor` (which the proxy's rate limits use): it is a
//! lockout counter, not a rate limit. It is read before a login without spending anything
//! ([`Failures::locked`]), charged only on a failure, and one pair is forgotten on success
//! ([`Failures::clear`]); governor can neither read a key's state without consuming a cell nor
//! remove a single key.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics as m;

/// Most (source, user) pairs tracked at once. New pairs beyond it are not tracked (and so not
/// throttled here) until old ones expire; the proxy's relay limits still apply.
pub const MAX_TRACKED: usize = 100_000;

/// Failed logins per (source address, user) within a window.
pub struct Failures {
    map: Mutex<Tracked>,
    limit: u32,
    window: Duration,
}

struct Tracked {
    entries: HashMap<(IpAddr, String), (Instant, u32)>,
    pruned: Instant,
}

impl Failures {
    /// `limit` failures per pair within `window`.
    pub fn new(limit: u32, window: Duration) -> Failures {
        Failures {
            map: Mutex::new(Tracked {
                entries: HashMap::new(),
                pruned: Instant::now(),
            }),
            limit,
            window,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tracked> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `source` has used up its failures for `user`.
    pub fn locked(&self, source: IpAddr, user: &str) -> bool {
        let t = self.lock();
        t.entries
            .get(&(source, user.to_string()))
            .is_some_and(|(since, n)| since.elapsed() < self.window && *n >= self.limit)
    }

    /// Counts a failure of `source` for `user`.
    pub fn fail(&self, source: IpAddr, user: &str) {
        let mut t = self.lock();
        if t.pruned.elapsed() >= self.window || t.entries.len() >= MAX_TRACKED {
            let window = self.window;
            t.entries.retain(|_, (since, _)| since.elapsed() < window);
            t.pruned = Instant::now();
        }
        let key = (source, user.to_string());
        if t.entries.len() >= MAX_TRACKED && !t.entries.contains_key(&key) {
            return;
        }
        let e = t.entries.entry(key).or_insert((Instant::now(), 0));
        if e.0.elapsed() >= self.window {
            *e = (Instant::now(), 0);
        }
        e.1 = e.1.saturating_add(1);
    }

    /// Forgets the failures of `source` for `user` (after a successful login).
    pub fn clear(&self, source: IpAddr, user: &str) {
        self.lock().entries.remove(&(source, user.to_string()));
    }

    /// The window failures are counted in.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Pairs tracked now (expired ones included until the next prune).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no pair is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The login was not run: every hashing slot is taken and the queue is full or its deadline
/// passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the Auth server is busy checking passwords: retry in {retry_after_secs} s")]
pub struct Busy {
    /// Seconds the caller should wait before retrying.
    pub retry_after_secs: u64,
}

type Job = Box<dyn FnOnce() + Send>;

/// Bounds concurrent password hashing: `slots` worker threads of its own, at most `max_queued`
/// logins waiting for one, each for at most `wait`. Argon2id takes about 19 MiB per hash, and
/// the allocator keeps that much per thread that ever hashed, so the work runs on these fixed
/// threads (not tokio's blocking pool, which grows to 512 threads): memory stays near
/// `slots` × 19 MiB however many logins arrive.
pub struct HashGate {
    slots: Arc<Semaphore>,
    queued: AtomicUsize,
    max_queued: usize,
    wait: Duration,
    jobs: std::sync::mpsc::Sender<Job>,
}

impl HashGate {
    /// A gate of `slots` hashing threads.
    pub fn new(slots: usize, max_queued: usize, wait: Duration) -> HashGate {
        let slots = slots.max(1);
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..slots {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("postern-hash-{i}"))
                .spawn(move || {
                    loop {
                        // The lock is held only while waiting for the next job.
                        let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                            Ok(j) => j,
                            Err(_) => return,
                        };
                        job();
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password-hashing thread");
            }
        }
        HashGate {
            slots: Arc::new(Semaphore::new(slots)),
            queued: AtomicUsize::new(0),
            max_queued,
            wait,
            jobs,
        }
    }

    fn busy(&self) -> Busy {
        Busy {
            retry_after_secs: self.wait.as_secs().clamp(1, 10),
        }
    }

    /// Waits for a hashing slot, or says why not.
    async fn enter(&self) -> Result<OwnedSemaphorePermit, Busy> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Ok(p);
        }
        if self.queued.fetch_add(1, Ordering::SeqCst) >= self.max_queued {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(self.busy());
        }
        metrics::gauge!(m::LOGINS_QUEUED).increment(1.0);
        let r = tokio::time::timeout(self.wait, self.slots.clone().acquire_owned()).await;
        self.queued.fetch_sub(1, Ordering::SeqCst);
        metrics::gauge!(m::LOGINS_QUEUED).decrement(1.0);
        match r {
            Ok(Ok(p)) => Ok(p),
            _ => Err(self.busy()),
        }
    }

    /// Runs `f` (blocking: Argon2, storage) on a hashing thread once a slot is free, or answers
    /// [`Busy`] when the queue is full or its deadline passes.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Busy> {
        let permit = self.enter().await?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _permit = permit;
            let _ = tx.send(f());
        });
        if self.jobs.send(job).is_err() {
            return Err(self.busy());
        }
        rx.await.map_err(|_| self.busy())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_per_source_and_pruned_by_time() {
        let f = Failures::new(2, Duration::from_millis(50));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        f.fail(a, "bob");
        f.fail(a, "bob");
        assert!(f.locked(a, "bob"));
        assert!(!f.locked(b, "bob"), "another address is not locked out");
        for i in 0..1000 {
            f.fail(b, &format!("user{i}"));
        }
        assert_eq!(f.len(), 1001);
        std::thread::sleep(Duration::from_millis(60));
        assert!(!f.locked(a, "bob"), "the lock ends with the window");
        f.fail(b, "late");
        assert_eq!(f.len(), 1, "expired pairs are pruned");
    }

    #[tokio::test]
    async fn the_gate_bounds_slots_and_queue() {
        let g = Arc::new(HashGate::new(1, 1, Duration::from_millis(100)));
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let g1 = g.clone();
        let held = tokio::spawn(async move { g1.run(move || hold.recv().is_ok()).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let g2 = g.clone();
        let queued = tokio::spawn(async move { g2.run(|| ()).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            g.run(|| ()).await.unwrap_err(),
            Busy {
                retry_after_secs: 1
            },
            "the queue is full"
        );
        assert!(
            queued.await.unwrap().is_err(),
            "the queued one hit its deadline"
        );
        release.send(()).unwrap();
        assert_eq!(held.await.unwrap(), Ok(true));
        assert_eq!(g.run(|| 7).await, Ok(7));
    }
}
