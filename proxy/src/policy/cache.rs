//! The roles, users and locks of one cluster as its Auth server last sent them, the revision they
//! are at, and when the proxy last heard from the Auth server.

use std::collections::HashMap;
use std::sync::{RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use postern_api::proto::{Lock, PolicyAccessRequest, PolicyEvent, Role};

use super::Who;

/// The cached policy.
#[derive(Debug, Default, Clone)]
pub struct PolicyState {
    /// Role definitions by name.
    roles: HashMap<String, Role>,
    /// Each user's current roles.
    users: HashMap<String, Vec<String>>,
    /// Users deleted while this proxy watched (a new login of theirs is refused; a user not yet
    /// seen may just be newer than the cache, and is refused only when it opens a stream).
    deleted: std::collections::HashSet<String>,
    /// Locks by id.
    locks: HashMap<String, Lock>,
    /// Access requests by id (their approved roles count for certificates naming them).
    requests: HashMap<String, PolicyAccessRequest>,
    /// The revision everything here is at.
    revision: u64,
    /// Whether a whole snapshot has been applied.
    loaded: bool,
    /// When the Auth server last said anything (an event or a heartbeat).
    last_heard: Option<Instant>,
    /// Snapshots applied so far (a resumed watch applies none).
    snapshots: u64,
    /// A snapshot being received, swapped in whole at its end.
    pending: Option<Box<PolicyState>>,
}

/// A cluster's policy cache, written by its watcher and read at every decision.
#[derive(Debug)]
pub struct PolicyCache {
    state: RwLock<PolicyState>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Default for PolicyCache {
    fn default() -> Self {
        PolicyCache {
            state: RwLock::default(),
            changed: tokio::sync::watch::channel(0).0,
        }
    }
}

fn now_unix() -> u64 {
    postern_dial::mint::now_unix()
}

fn apply_one(s: &mut PolicyState, ev: PolicyEvent) {
    match ev.kind.as_str() {
        "role" if ev.deleted => {
            s.roles.remove(&ev.name);
        }
        "role" => {
            if let Some(r) = ev.role {
                s.roles.insert(ev.name, r);
            }
        }
        "user" if ev.deleted => {
            s.users.remove(&ev.name);
            s.deleted.insert(ev.name);
        }
        "user" => {
            if let Some(u) = ev.user {
                s.deleted.remove(&ev.name);
                s.users.insert(ev.name, u.roles);
            }
        }
        "lock" if ev.deleted => {
            s.locks.remove(&ev.name);
        }
        "lock" => {
            if let Some(l) = ev.lock {
                s.locks.insert(ev.name, l);
            }
        }
        "access_request" if ev.deleted => {
            s.requests.remove(&ev.name);
        }
        "access_request" => {
            if let Some(r) = ev.access_request {
                s.requests.insert(ev.name, r);
            }
        }
        _ => {}
    }
}

impl PolicyCache {
    /// Applies one event of the watch; returns whether the policy changed (callers then
    /// re-check what is open). Snapshot events are gathered and swapped in whole at the end.
    pub fn apply(&self, ev: PolicyEvent) -> bool {
        let mut s = self.state.write().unwrap_or_else(|p| p.into_inner());
        s.last_heard = Some(Instant::now());
        if ev.snapshot {
            if ev.snapshot_end {
                let mut next = *s.pending.take().unwrap_or_default();
                next.revision = ev.revision;
                next.loaded = true;
                next.last_heard = s.last_heard;
                next.snapshots = s.snapshots + 1;
                *s = next;
                drop(s);
                self.changed.send_replace(ev.revision);
                return true;
            }
            let pending = s.pending.get_or_insert_with(Box::default);
            apply_one(pending, ev);
            return false;
        }
        if ev.kind.is_empty() {
            return false; // a heartbeat
        }
        s.revision = ev.revision;
        apply_one(&mut s, ev);
        let rev = s.revision;
        drop(s);
        self.changed.send_replace(rev);
        true
    }

    /// The revision the cache is at (what a resumed watch starts from); 0 before any snapshot.
    pub fn revision(&self) -> u64 {
        let s = self.state.read().unwrap_or_else(|p| p.into_inner());
        if s.loaded { s.revision } else { 0 }
    }

    /// How many snapshots were applied (a watch that resumed adds none).
    pub fn snapshots(&self) -> u64 {
        self.state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .snapshots
    }

    /// Notified with the revision after each change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The soonest end (unix seconds) of an approved elevation still running, if any: when the
    /// watcher must re-decide what is open.
    pub fn next_elevation_end(&self) -> Option<u64> {
        let now = now_unix();
        let s = self.state.read().unwrap_or_else(|p| p.into_inner());
        s.requests
            .values()
            .filter(|r| r.state == "approved" && r.expires > now)
            .map(|r| r.expires)
            .min()
    }

    /// A consistent read of the cache.
    pub fn view(&self) -> View<'_> {
        View(self.state.read().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A read of the cache; decisions take one so they see a single revision.
pub struct View<'a>(RwLockReadGuard<'a, PolicyState>);

impl View<'_> {
    /// `None` if fresh; `Some(None)` if never loaded; `Some(Some(age))` if older than `bound`.
    pub fn stale(&self, bound: Duration) -> Option<Option<Duration>> {
        if !self.0.loaded {
            return Some(None);
        }
        let age = self
            .0
            .last_heard
            .map(|t| t.elapsed())
            .unwrap_or(Duration::MAX);
        (age > bound).then_some(Some(age))
    }

    fn live_locks(&self) -> impl Iterator<Item = &Lock> {
        let now = now_unix();
        self.0
            .locks
            .values()
            .filter(move |l| l.expires == 0 || l.expires > now)
    }

    /// The message of a live lock on `user`.
    pub fn lock_on_user(&self, user: &str) -> Option<String> {
        self.live_locks()
            .find(|l| l.user == user)
            .map(|l| l.message.clone())
    }

    /// The message of a live lock on `role`.
    pub fn lock_on_role(&self, role: &str) -> Option<String> {
        self.live_locks()
            .find(|l| l.role == role)
            .map(|l| l.message.clone())
    }

    /// The message of a live lock on the agent `host_id`.
    pub fn lock_on_agent(&self, host_id: &str) -> Option<String> {
        self.live_locks()
            .find(|l| l.agent == host_id)
            .map(|l| l.message.clone())
    }

    /// The message of a live lock on the access request `id`.
    pub fn lock_on_request(&self, id: &str) -> Option<String> {
        self.live_locks()
            .find(|l| l.access_request == id)
            .map(|l| l.message.clone())
    }

    /// Whether the elevation of `who`'s certificate (its access request) is live: `None` when it
    /// carries none or the request is approved for this user and unexpired, `Some(Ok(why))` when
    /// it ended (denied, expired, another user's), `Some(Err(why))` when this proxy has not heard
    /// of the request or its approval yet (the feed may be behind the certificate).
    pub fn elevation_ended(&self, who: &Who) -> Option<Result<String, String>> {
        let id = who.request.as_deref()?;
        let Some(r) = self.0.requests.get(id) else {
            return Some(Err(format!(
                "this proxy has not yet heard of access request '{id}': retry shortly"
            )));
        };
        if r.user != who.user {
            return Some(Ok(format!(
                "access request '{id}' is not user '{}''s",
                who.user
            )));
        }
        match r.state.as_str() {
            "approved" => {}
            // A certificate is issued only after the approval: this proxy is behind.
            "pending" => {
                return Some(Err(format!(
                    "this proxy has not yet heard of the approval of access request '{id}': retry shortly"
                )));
            }
            other => return Some(Ok(format!("access request '{id}' is {other}"))),
        }
        if r.expires <= now_unix() {
            return Some(Ok(format!(
                "the elevation of access request '{id}' ended: log in again (psh login)"
            )));
        }
        None
    }

    /// Whether the user was deleted while this proxy watched.
    pub fn user_deleted(&self, user: &str) -> bool {
        self.0.deleted.contains(user)
    }

    /// Whether the user exists now.
    pub fn user_exists(&self, user: &str) -> bool {
        self.0.users.contains_key(user)
    }

    /// The roles `who` holds now: the user's current roles, and of those only the ones its
    /// certificate lists when it lists any (a role removed from the user stops counting at once;
    /// a role added later needs a new certificate).
    ///
    /// A certificate naming a live access request (see [`View::elevation_ended`]) also holds
    /// that request's roles that it lists.
    pub fn effective_roles(&self, who: &Who) -> Vec<String> {
        let current = self.0.users.get(&who.user).cloned().unwrap_or_default();
        let mut roles: Vec<String> = match &who.cert_roles {
            Some(cert) => current.into_iter().filter(|r| cert.contains(r)).collect(),
            None => current,
        };
        if let (Some(id), Some(cert)) = (&who.request, &who.cert_roles)
            && self.elevation_ended(who).is_none()
            && let Some(r) = self.0.requests.get(id)
        {
            for role in &r.roles {
                if cert.contains(role) && !roles.contains(role) {
                    roles.push(role.clone());
                }
            }
        }
        roles
    }

    /// The definitions of `names` that exist.
    pub fn role_defs(&self, names: &[String]) -> Vec<Role> {
        names
            .iter()
            .filter_map(|n| self.0.roles.get(n).cloned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache_with(state: &str, user: &str, expires: u64) -> PolicyCache {
        let c = PolicyCache::default();
        c.apply(PolicyEvent {
            kind: "user".into(),
            name: "alice".into(),
            snapshot: true,
            user: Some(postern_api::proto::PolicyUser {
                name: "alice".into(),
                roles: vec!["base".into()],
            }),
            ..Default::default()
        });
        c.apply(PolicyEvent {
            kind: "access_request".into(),
            name: "r1".into(),
            snapshot: true,
            access_request: Some(PolicyAccessRequest {
                id: "r1".into(),
                user: user.into(),
                roles: vec!["editor".into()],
                state: state.into(),
                expires,
            }),
            ..Default::default()
        });
        c.apply(PolicyEvent {
            revision: 2,
            snapshot: true,
            snapshot_end: true,
            ..Default::default()
        });
        c
    }

    fn alice(request: Option<&str>) -> Who {
        Who {
            user: "alice".into(),
            cert_roles: Some(vec!["base".into(), "editor".into()]),
            request: request.map(str::to_owned),
        }
    }

    #[test]
    fn elevated_roles_count_only_while_the_request_is_live_and_the_users() {
        let later = now_unix() + 600;
        let live = cache_with("approved", "alice", later);
        assert_eq!(
            live.view().effective_roles(&alice(Some("r1"))),
            ["base", "editor"]
        );
        // Without the request in the certificate, listing the role is not enough.
        assert_eq!(live.view().effective_roles(&alice(None)), ["base"]);
        // Another user's request, a denied or expired one: ended.
        for c in [
            cache_with("approved", "mallory", later),
            cache_with("denied", "alice", later),
            cache_with("approved", "alice", now_unix()),
        ] {
            assert!(matches!(
                c.view().elevation_ended(&alice(Some("r1"))),
                Some(Ok(_))
            ));
            assert_eq!(c.view().effective_roles(&alice(Some("r1"))), ["base"]);
        }
        // Pending or unknown: this proxy is behind the certificate, not a reason to close.
        let behind = cache_with("pending", "alice", later);
        assert!(matches!(
            behind.view().elevation_ended(&alice(Some("r1"))),
            Some(Err(_))
        ));
        assert!(matches!(
            live.view().elevation_ended(&alice(Some("r2"))),
            Some(Err(_))
        ));
        assert_eq!(live.next_elevation_end(), Some(later));
    }
}
