//! The agent pool: a tunnel to every proxy of the cluster, through one balanced address.
//!
//! Proxies sit behind an L4 load balancer; a client lands on any of them, so every proxy needs a
//! tunnel from every agent. The agent knows one address (the balancer's). Each proxy tells it, on
//! `@control`, its id (hello) and the cluster's proxy set (`ProxySet`, from the proxies'
//! heartbeats to the Auth server). The pool, as Teleport's agent pool does:
//!
//! - **dials** the balanced address, one dial at a time, while the set names a proxy it holds no
//!   tunnel to (or while it holds none). A dial that lands on a proxy it already holds is closed
//!   (before any target is registered) and counts as a miss: misses back off exponentially with
//!   full jitter up to `pool.hunt_cap_ms`, so a proxy in the set that never answers costs a
//!   bounded dial rate, never a spin, and the other tunnels carry on. A dial that fails (the
//!   balancer refused it, a login failed) backs off separately, up to `reconnect.cap_ms`, as a
//!   lone agent's reconnects do;
//! - **probes** every `pool.probe_secs` even when it holds the whole set: a proxy that has just
//!   started cannot be in the set before some `auth` agent reached it (the Auth server is only
//!   reachable through tunnels), so only dialling finds it. The Auth server's own agent probes
//!   every 5 s and once more after each dial that reached a new proxy (`probe_after_gain`);
//! - **drops** a tunnel to a proxy that left the set: when every other held tunnel's latest set
//!   has omitted it for [`DROP_AFTER`] (a proxy's own word does not keep itself in; the delay
//!   covers the heartbeat by which one proxy learns of a newcomer after another did);
//! - on a **drain** order, the draining tunnel stays open for its streams until the proxy closes it
//!   (at its grace deadline), the proxy is not hunted for again for [`DRAINED_FOR`], and the pool
//!   dials at once if any proxy is now missing: the replacements are the tunnels to the other
//!   proxies, which it normally holds already, so nothing waits for a dial.
//!
//! Cost: tunnels = agents × proxies (each an SSH connection with its keepalives), and every dial
//! that lands on a held proxy is a wasted handshake; see `docs/agent-pool.md` for the limit where
//! proxy peering is the better design.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::Dialer;
use crate::failure::Failure;
use crate::tunnel::Ended;
use crate::{backoff_ceiling, full_jitter};

/// How long at most a proxy that ordered a drain is not dialled for (it is leaving the set
/// meanwhile; once no held tunnel's set lists it, it may be hunted again when it returns).
pub const DRAINED_FOR: Duration = Duration::from_secs(60);
/// How long every other held tunnel's set must omit a held proxy before its tunnel is dropped.
pub const DROP_AFTER: Duration = Duration::from_secs(30);
/// Longest wait for one dial to reach its proxy's hello (login included).
const DIAL_DEADLINE: Duration = Duration::from_secs(30);

/// `[pool]` in `agent.toml`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Hold a tunnel to every proxy of the set (default true). Off: one tunnel to whichever
    /// proxy the address reaches, redialled when it ends.
    pub enabled: bool,
    /// Largest back-off ceiling, milliseconds, between dials that land on a proxy already held
    /// while another is missing. Default 15000.
    pub hunt_cap_ms: u64,
    /// Seconds between probe dials while every proxy of the set is held (0: never). Default 60.
    pub probe_secs: u64,
    /// After a dial that reached a new proxy, probe once more at once (default false). For the
    /// Auth server's own agent: proxies only join the set through its tunnels, so it finds them
    /// by dialling (round robin: one dial per proxy, then one miss).
    pub probe_after_gain: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            enabled: true,
            hunt_cap_ms: 15_000,
            probe_secs: 60,
            probe_after_gain: false,
        }
    }
}

/// The pool's view: tunnels held, by proxy id, and what each last said the set is.
#[derive(Debug, Default)]
struct View {
    /// Held tunnels: proxy id → (tunnel number, its latest proxy set if any, its stop token).
    held: Held,
    /// Proxies that ordered a drain, and when.
    drained: HashMap<String, Instant>,
    /// Held proxies every other held tunnel's set omits, since when.
    omitted: HashMap<String, Instant>,
    /// The latest set from a proxy not (yet) held: its hello and set arrive together, before
    /// the tunnel claims it.
    pending: HashMap<String, BTreeSet<String>>,
    next: u64,
}

/// Held tunnels: proxy id → (tunnel number, its latest proxy set if any, its stop token).
type Held = HashMap<String, (u64, Option<BTreeSet<String>>, CancellationToken)>;

/// Every id some held tunnel's latest set lists.
fn listed(held: &Held) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for (_, set, _) in held.values() {
        if let Some(s) = set {
            all.extend(s.iter().cloned());
        }
    }
    all
}

/// Whether other held tunnels have sent a set and none of them lists `x`.
fn omitted_by_others(held: &Held, x: &str) -> bool {
    let mut others = held
        .iter()
        .filter(|(id, (_, s, _))| id.as_str() != x && s.is_some())
        .peekable();
    others.peek().is_some()
        && others.all(|(_, (_, s, _))| !s.as_ref().is_some_and(|s| s.contains(x)))
}

impl View {
    /// Notes which held proxies the others omit, and stops the tunnels of those omitted for
    /// [`DROP_AFTER`] by `now`. Returns the ids stopped.
    fn sweep(&mut self, now: Instant) -> Vec<String> {
        let omitted: Vec<String> = self
            .held
            .keys()
            .filter(|x| omitted_by_others(&self.held, x))
            .cloned()
            .collect();
        self.omitted.retain(|x, _| omitted.contains(x));
        let mut stopped = Vec::new();
        for x in omitted {
            let since = *self.omitted.entry(x.clone()).or_insert(now);
            if now.duration_since(since) >= DROP_AFTER
                && let Some((_, _, stop)) = self.held.get(&x)
                && !stop.is_cancelled()
            {
                info!(proxy = %x, "proxy left the proxy set: closing its tunnel");
                stop.cancel();
                stopped.push(x);
            }
        }
        stopped
    }
}

/// How one dial went, as the dialer learns it (its first report counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// It reached a proxy the pool did not hold.
    Claimed,
    /// It reached a proxy already held (a miss: hunting backs off up to `hunt_cap_ms`).
    Duplicate,
    /// It failed or ended before a claim (backs off up to `reconnect.cap_ms`, as a lone agent's
    /// reconnects do).
    Failed,
    /// It failed in a way that will not pass soon (see [`crate::failure`]): the next dial waits
    /// `reconnect.permanent_secs`.
    Permanent,
}

/// Shared by the pool's dialer and its tunnels.
pub struct Pool {
    view: Mutex<View>,
    /// Woken when a tunnel is claimed or lost, or a set arrives.
    changed: Notify,
    /// Dial outcomes for the dialer: `Some(id)` claimed, `None` ended without a claim.
    reports: mpsc::UnboundedSender<(u64, Outcome)>,
}

/// A held tunnel: dropping it releases the proxy id (the tunnel ended).
pub struct Claim {
    pool: Arc<Pool>,
    id: String,
    number: u64,
}

impl Claim {
    /// The proxy ordered a drain: do not hunt for it for [`DRAINED_FOR`].
    pub fn drained(&self) {
        let mut v = self.pool.view.lock().expect("pool lock");
        v.drained.insert(self.id.clone(), Instant::now());
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut v = self.pool.view.lock().expect("pool lock");
        if v.held.get(&self.id).is_some_and(|h| h.0 == self.number) {
            v.held.remove(&self.id);
        }
        drop(v);
        self.pool.changed.notify_one();
    }
}

impl Pool {
    /// Called by a tunnel once its proxy said hello: the claim, or None if a tunnel to that proxy
    /// is already held (close this one). `attempt` is the dial's number.
    pub fn claim(
        self: &Arc<Self>,
        attempt: u64,
        proxy_id: &str,
        stop: &CancellationToken,
    ) -> Option<Claim> {
        let mut v = self.view.lock().expect("pool lock");
        if v.held.contains_key(proxy_id) {
            return None;
        }
        v.next += 1;
        let number = v.next;
        let set = v.pending.remove(proxy_id);
        v.held
            .insert(proxy_id.to_owned(), (number, set, stop.clone()));
        v.drained.remove(proxy_id);
        drop(v);
        let _ = self.reports.send((attempt, Outcome::Claimed));
        self.changed.notify_one();
        Some(Claim {
            pool: self.clone(),
            id: proxy_id.to_owned(),
            number,
        })
    }

    /// Records the proxy set `from` sent; stops tunnels to proxies that left it.
    pub fn proxy_set(&self, from: &str, ids: Vec<String>) {
        let mut v = self.view.lock().expect("pool lock");
        let ids: BTreeSet<String> = ids.into_iter().collect();
        let Some(h) = v.held.get_mut(from) else {
            v.pending.insert(from.to_owned(), ids);
            return;
        };
        h.1 = Some(ids);
        v.sweep(Instant::now());
        drop(v);
        self.changed.notify_one();
    }

    /// Proxy ids held now, sorted.
    pub fn held(&self) -> Vec<String> {
        let v = self.view.lock().expect("pool lock");
        let mut ids: Vec<String> = v.held.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// The proxies of the believed set not held (drained ones excluded), and whether none is held.
    fn missing(&self) -> (Vec<String>, bool) {
        let mut v = self.view.lock().expect("pool lock");
        v.sweep(Instant::now());
        let set = listed(&v.held);
        // A drained proxy is not hunted while it is leaving; once no set lists it any more it
        // has left, and if it comes back (restarted with the same id) it is hunted again.
        v.drained
            .retain(|id, at| at.elapsed() < DRAINED_FOR && set.contains(id));
        let missing = set
            .into_iter()
            .filter(|id| !v.held.contains_key(id) && !v.drained.contains_key(id))
            .collect();
        (missing, v.held.is_empty())
    }
}

/// One dial: a tunnel that claims its proxy in the pool, serves until it ends, and reports. The
/// dial is the lone agent's ([`Dialer::dial`]): own-certificate check and reload, QUIC first,
/// reconnects counted by reason, failures classified.
async fn dial(dialer: Arc<Dialer>, pool: Arc<Pool>, attempt: u64, stop: CancellationToken) {
    let r = dialer.dial(&stop, Some((&pool, attempt))).await;
    let outcome = match &r {
        Ok(Ended::Duplicate) => {
            debug!(attempt, "dial reached a proxy already held: closed");
            Outcome::Duplicate
        }
        Ok(e) => {
            debug!(attempt, ended = ?e, "tunnel ended");
            Outcome::Failed
        }
        Err(Failure::Transient(e)) => {
            warn!(attempt, error = %e, "tunnel attempt failed");
            Outcome::Failed
        }
        Err(Failure::Permanent(e)) => {
            error!(
                attempt,
                retry_in_secs = dialer.config.reconnect.permanent_secs,
                "{e}"
            );
            Outcome::Permanent
        }
    };
    // Ignored by the dialer if this dial already claimed its proxy.
    let _ = pool.reports.send((attempt, outcome));
}

/// Runs the pool until `shutdown`: see the module docs.
pub async fn run(dialer: Arc<Dialer>, shutdown: CancellationToken) {
    let config = &dialer.config;
    let (tx, mut reports) = mpsc::unbounded_channel();
    let pool = Arc::new(Pool {
        view: Mutex::default(),
        changed: Notify::new(),
        reports: tx,
    });
    let base = Duration::from_millis(config.reconnect.base_ms);
    let cap = Duration::from_millis(config.reconnect.cap_ms);
    let hunt_cap = Duration::from_millis(config.pool.hunt_cap_ms).max(cap);
    let probe = (config.pool.probe_secs > 0).then(|| Duration::from_secs(config.pool.probe_secs));
    let permanent = Duration::from_secs(config.reconnect.permanent_secs);
    let (mut misses, mut failures) = (0u32, 0u32);
    let mut attempt = 0u64;
    let mut last_dial = Instant::now();
    let mut gained = false;
    loop {
        let (missing, none_held) = pool.missing();
        let probe_due = probe.is_some_and(|p| last_dial.elapsed() >= p)
            || (gained && config.pool.probe_after_gain);
        if !none_held && missing.is_empty() && !probe_due {
            // Wake at least every 5 s: a proxy that left the set is dropped by `missing`'s sweep.
            let wait = probe
                .map_or(Duration::from_secs(5), |p| {
                    p.saturating_sub(last_dial.elapsed())
                })
                .min(Duration::from_secs(5));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = pool.changed.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            continue;
        }
        attempt += 1;
        last_dial = Instant::now();
        debug!(
            attempt,
            ?missing,
            none_held,
            probe_due,
            "dialling the balanced address"
        );
        tokio::spawn(dial(
            dialer.clone(),
            pool.clone(),
            attempt,
            shutdown.child_token(),
        ));
        // The first report of this attempt: its claim, or its end without one.
        let deadline = tokio::time::sleep(DIAL_DEADLINE);
        tokio::pin!(deadline);
        let outcome = loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = &mut deadline => break Outcome::Failed,
                r = reports.recv() => match r {
                    Some((n, o)) if n == attempt => break o,
                    Some(_) => {}
                    None => return,
                },
            }
        };
        gained = outcome == Outcome::Claimed;
        let wait = match outcome {
            Outcome::Claimed => {
                (misses, failures) = (0, 0);
                // Even after a gain, a little jitter: a proxy that accepts and drops at once
                // cannot make the pool spin.
                full_jitter(base)
            }
            Outcome::Duplicate => {
                misses = misses.saturating_add(1);
                failures = 0;
                let (missing, none_held) = pool.missing();
                let ceiling_cap = if none_held || missing.is_empty() {
                    cap
                } else {
                    hunt_cap
                };
                full_jitter(backoff_ceiling(base, ceiling_cap, misses - 1))
            }
            Outcome::Failed => {
                failures = failures.saturating_add(1);
                full_jitter(backoff_ceiling(base, cap, failures - 1))
            }
            Outcome::Permanent => {
                (misses, failures) = (0, 0);
                permanent
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(entries: &[(&str, Option<&[&str]>)]) -> Held {
        entries
            .iter()
            .map(|(id, set)| {
                (
                    id.to_string(),
                    (
                        0,
                        set.map(|s| s.iter().map(|x| x.to_string()).collect()),
                        CancellationToken::new(),
                    ),
                )
            })
            .collect()
    }

    fn set(ids: &[&str]) -> Option<BTreeSet<String>> {
        Some(ids.iter().map(|x| x.to_string()).collect())
    }

    #[test]
    fn the_set_is_every_id_listed_and_a_proxy_is_left_out_by_the_others() {
        let h = held(&[("a", Some(&["a", "b", "c"])), ("b", Some(&["a", "b"]))]);
        assert_eq!(listed(&h).into_iter().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert!(!omitted_by_others(&h, "a"));
        assert!(!omitted_by_others(&h, "b"), "a lists b");
        // b left: a and c say so; b's own stale word does not keep it.
        let h = held(&[
            ("a", Some(&["a", "c"])),
            ("b", Some(&["a", "b", "c"])),
            ("c", Some(&["a", "c"])),
        ]);
        assert!(omitted_by_others(&h, "b"));
        // Only one tunnel, or others without a set yet: no say.
        assert!(!omitted_by_others(&held(&[("a", Some(&["a"]))]), "a"));
        assert!(!omitted_by_others(
            &held(&[("a", Some(&["a"])), ("b", None)]),
            "a"
        ));
    }

    #[test]
    fn a_held_proxy_is_dropped_only_after_the_others_omit_it_for_drop_after() {
        // The newcomer b is not yet in a's set (a learns of it a heartbeat later): b stays.
        let mut v = View {
            held: held(&[("a", Some(&["a"])), ("b", Some(&["a", "b"]))]),
            ..Default::default()
        };
        let t0 = Instant::now();
        assert!(v.sweep(t0).is_empty());
        assert!(v.sweep(t0 + DROP_AFTER / 2).is_empty());
        // a hears of b: the clock for b stops.
        v.held.get_mut("a").unwrap().1 = set(&["a", "b"]);
        assert!(v.sweep(t0 + DROP_AFTER * 2).is_empty());
        assert!(v.omitted.is_empty());
        // b leaves a's set for good: dropped after DROP_AFTER, once.
        v.held.get_mut("a").unwrap().1 = set(&["a"]);
        let t1 = t0 + DROP_AFTER * 3;
        assert!(v.sweep(t1).is_empty());
        assert_eq!(v.sweep(t1 + DROP_AFTER), ["b"]);
        assert!(v.held["b"].2.is_cancelled());
        assert!(v.sweep(t1 + DROP_AFTER * 2).is_empty());
        assert!(!v.held["a"].2.is_cancelled());
    }
}
