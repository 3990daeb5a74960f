//! Live client connections and agent tunnels, with the streams each client holds, so that a
//! policy change (a lock, a deleted user, a role taken away) closes what it now forbids.
//!
//! A connection is closed whole, with the refusal as its disconnect message (which `ssh` prints):
//! a locked or deleted identity loses every stream at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{ClusterPolicy, Who};
use crate::routing::Labels;

/// What a registered connection is.
#[derive(Debug, Clone)]
pub enum Kind {
    /// A client logged in as `who`.
    Client(Who),
    /// An agent tunnel of host `host_id`.
    Agent(String),
}

/// One live connection.
#[derive(Debug)]
pub struct Entry {
    /// Its cluster.
    pub cluster: String,
    /// Client or agent.
    pub kind: Kind,
    /// Cancelled when the policy closes the connection.
    pub kicked: CancellationToken,
    reason: Mutex<Option<String>>,
    streams: Mutex<HashMap<u64, (String, Option<Labels>)>>,
    next_stream: AtomicU64,
}

impl Entry {
    /// Closes the connection with `reason` (once; later reasons are ignored).
    pub fn kick(&self, reason: &str) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason.to_owned());
            self.kicked.cancel();
        }
    }

    /// Why it was closed.
    pub fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records an open stream; dropping the guard forgets it.
    pub fn add_stream(self: &Arc<Self>, target: &str, labels: Option<Labels>) -> StreamGuard {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (target.to_owned(), labels));
        StreamGuard(self.clone(), id)
    }
}

/// An open stream of a registered client; dropping it forgets the stream.
pub struct StreamGuard(Arc<Entry>, u64);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.1);
    }
}

/// Every live connection, by id.
#[derive(Debug, Default)]
pub struct Registry {
    next: AtomicU64,
    entries: Mutex<HashMap<u64, Arc<Entry>>>,
}

/// A registered connection; dropping it (with the connection) unregisters it.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<Registry>,
    id: u64,
    /// The entry.
    pub entry: Arc<Entry>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl Registry {
    /// Registers a logged-in connection.
    pub fn register(self: &Arc<Self>, cluster: &str, kind: Kind) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry {
            cluster: cluster.to_owned(),
            kind,
            kicked: CancellationToken::new(),
            reason: Mutex::default(),
            streams: Mutex::default(),
            next_stream: AtomicU64::new(0),
        });
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, entry.clone());
        Registration {
            registry: self.clone(),
            id,
            entry,
        }
    }

    /// Re-decides every connection of `policy`'s cluster and closes those it now refuses (a
    /// lock, a deleted user, a role taken away). A stale policy closes nothing: it only stops new
    /// streams. Returns how many were closed.
    pub fn enforce(&self, policy: &ClusterPolicy) -> usize {
        let entries: Vec<Arc<Entry>> = self
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|e| e.cluster == policy.cluster && !e.kicked.is_cancelled())
            .cloned()
            .collect();
        let mut closed = 0;
        for e in entries {
            let verdict = match &e.kind {
                Kind::Agent(host_id) => policy.check_agent(host_id),
                Kind::Client(who) => {
                    let streams: Vec<(String, Option<Labels>)> = e
                        .streams
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .values()
                        .cloned()
                        .collect();
                    policy.check_user(who).and_then(|()| {
                        streams
                            .iter()
                            .try_for_each(|(t, l)| policy.decide(who, t, l.as_ref()))
                    })
                }
            };
            if let Err(r) = verdict
                && r.result != "policy_unavailable"
            {
                info!(cluster = %e.cluster, who = ?e.kind, reason = %r.reason, "closing connection: policy changed");
                e.kick(&r.reason);
                closed += 1;
            }
        }
        closed
    }
}
