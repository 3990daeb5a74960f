//! Access requests: a user asks for roles its roles allow requesting (`allow.request.roles`), a
//! reviewer whose roles allow reviewing them (`allow.review_requests.roles`) approves or denies,
//! and the user has its certificates reissued once with the approved roles added, expiring no
//! later than the elevation's end.
//!
//! Requests are resources of kind `access_request` (a review is a conditional write, so two
//! reviewers cannot both decide) and travel in the policy feed, so proxies count the elevated
//! roles only while the request is approved, unexpired and unlocked. The TLS certificate is
//! recorded with its request id, so the Auth API does the same at every call
//! ([`caller_roles`]). The RPCs are in `rpc`, the certificate records in `store`.

use postern_api::proto::{AccessRequest, PolicyAccessRequest};
use postern_dial::mint::now_unix;
use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::locks::StoredLock;
use crate::service::{State, storage_status};

mod rpc;
mod store;

/// Resource kind of a stored request.
pub const KIND: &str = "access_request";
/// How long a request may wait for a review before it lapses (a day).
pub const PENDING_TTL_SECS: u64 = 24 * 3600;
/// Longest reason, bytes (request and review).
pub const MAX_REASON: usize = 1024;
/// Most roles one request may ask for.
pub const MAX_ROLES: usize = 16;

/// Waiting for a review.
pub const PENDING: &str = "pending";
/// Approved: the elevation lasts until `expires`.
pub const APPROVED: &str = "approved";
/// Denied.
pub const DENIED: &str = "denied";

/// A request as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRequest {
    /// Who asked.
    pub user: String,
    /// The roles asked for.
    pub roles: Vec<String>,
    /// Why (shown to reviewers).
    pub reason: String,
    /// [`PENDING`], [`APPROVED`] or [`DENIED`].
    pub state: String,
    /// How long the elevation lasts once approved, seconds (checked against `max_duration` at
    /// creation).
    pub duration_secs: u64,
    /// Unix seconds.
    pub created: u64,
    /// Who reviewed it.
    #[serde(default)]
    pub reviewer: String,
    /// When (unix seconds; 0 while pending).
    #[serde(default)]
    pub reviewed: u64,
    /// The reviewer's reason.
    #[serde(default)]
    pub review_reason: String,
    /// Pending: when it lapses; approved: the elevation's end (unix seconds).
    pub expires: u64,
    /// When certificates were issued with it (unix seconds; 0: not yet). An approval is used once.
    #[serde(default)]
    pub used: u64,
}

impl StoredRequest {
    /// The wire form, named `id`.
    pub fn to_proto(&self, id: &str) -> AccessRequest {
        AccessRequest {
            id: id.into(),
            user: self.user.clone(),
            roles: self.roles.clone(),
            reason: self.reason.clone(),
            state: self.state.clone(),
            duration_secs: self.duration_secs,
            created: self.created,
            reviewer: self.reviewer.clone(),
            reviewed: self.reviewed,
            review_reason: self.review_reason.clone(),
            expires: self.expires,
        }
    }

    /// What a proxy learns of it.
    pub fn to_policy(&self, id: &str) -> PolicyAccessRequest {
        PolicyAccessRequest {
            id: id.into(),
            user: self.user.clone(),
            roles: self.roles.clone(),
            state: self.state.clone(),
            expires: self.expires,
        }
    }

    /// Why the approval cannot be used by `user` at `now`, if it cannot (denied, pending, lapsed,
    /// expired, another user's). `id` names it in the message.
    pub fn unusable(&self, id: &str, user: &str, now: u64) -> Option<String> {
        if self.user != user {
            return Some(format!(
                "access request '{id}' belongs to another user: only its requester may use it"
            ));
        }
        match self.state.as_str() {
            DENIED => Some(format!(
                "access request '{id}' was denied by '{}'{}",
                self.reviewer,
                reason_suffix(&self.review_reason)
            )),
            PENDING if self.expires <= now => Some(format!(
                "access request '{id}' lapsed unreviewed: create a new one"
            )),
            PENDING => Some(format!(
                "access request '{id}' is still pending: wait for a reviewer's approval"
            )),
            _ if self.expires <= now => Some(format!(
                "access request '{id}' expired: its elevation ended at {} (unix); create a new request",
                self.expires
            )),
            _ => None,
        }
    }
}

fn reason_suffix(r: &str) -> String {
    if r.is_empty() {
        String::new()
    } else {
        format!(": {r}")
    }
}

/// A new request id: 16 hex digits.
pub fn new_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// The message of a live lock on `user` or on the access request `request`, if any.
pub fn lock_on(state: &State, user: &str, request: Option<&str>) -> Result<Option<String>, Status> {
    let now = now_unix();
    for item in state.backend.list("lock").map_err(storage_status)? {
        let Ok(l) = serde_json::from_str::<StoredLock>(&item.value) else {
            continue;
        };
        if l.expires != 0 && l.expires <= now {
            continue;
        }
        let on_request =
            request.is_some_and(|r| !l.access_request.is_empty() && l.access_request == r);
        if l.user == user || on_request {
            return Ok(Some(l.message));
        }
    }
    Ok(None)
}

/// Loads a stored request; NOT_FOUND names it.
pub fn load(state: &State, id: &str) -> Result<(StoredRequest, u64), Status> {
    let item = state
        .backend
        .get(KIND, id)
        .map_err(storage_status)?
        .ok_or_else(|| Status::not_found(format!("access request '{id}' not found")))?;
    let r = serde_json::from_str(&item.value)
        .map_err(|e| Status::internal(format!("stored access request '{id}' is corrupt: {e}")))?;
    Ok((r, item.revision))
}

/// The role names a caller holds at this call: its standing `roles`, plus an approved request's
/// roles when its client certificate (`fingerprint`) was issued with one. A lock on the user, or
/// on the request, refuses the call (PERMISSION_DENIED with the lock's message); an elevation
/// that has ended refuses it too (UNAUTHENTICATED: log in again).
pub fn caller_roles(
    state: &State,
    fingerprint: &str,
    user: &str,
    mut roles: Vec<String>,
) -> Result<Vec<String>, Status> {
    let request = state
        .backend
        .cert_request(fingerprint)
        .map_err(storage_status)?;
    if let Some(msg) = lock_on(state, user, request.as_deref())? {
        return Err(Status::permission_denied(format!("locked: {msg}")));
    }
    let Some(id) = request else {
        return Ok(roles);
    };
    let (r, _) = match load(state, &id) {
        Ok(r) => r,
        Err(s) if s.code() == tonic::Code::NotFound => {
            return Err(Status::unauthenticated(format!(
                "access request '{id}' no longer exists: this certificate's elevation ended; run psh login again"
            )));
        }
        Err(s) => return Err(s),
    };
    if let Some(why) = r.unusable(&id, user, now_unix()) {
        return Err(Status::unauthenticated(format!(
            "{why}: this certificate's elevation ended; run psh login again"
        )));
    }
    for role in r.roles {
        if !roles.contains(&role) {
            roles.push(role);
        }
    }
    Ok(roles)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn approved(expires: u64) -> StoredRequest {
        StoredRequest {
            user: "alice".into(),
            roles: vec!["editor".into()],
            reason: String::new(),
            state: APPROVED.into(),
            duration_secs: 60,
            created: 1,
            reviewer: "bob".into(),
            reviewed: 2,
            review_reason: String::new(),
            expires,
            used: 0,
        }
    }

    #[test]
    fn only_its_requester_uses_an_unexpired_approval() {
        let r = approved(100);
        assert_eq!(r.unusable("x", "alice", 99), None);
        assert!(r.unusable("x", "alice", 100).unwrap().contains("expired"));
        assert!(
            r.unusable("x", "mallory", 99)
                .unwrap()
                .contains("another user")
        );
        let mut d = approved(100);
        d.state = DENIED.into();
        d.review_reason = "no".into();
        assert!(
            d.unusable("x", "alice", 1)
                .unwrap()
                .contains("denied by 'bob': no")
        );
        let mut p = approved(100);
        p.state = PENDING.into();
        assert!(p.unusable("x", "alice", 1).unwrap().contains("pending"));
        assert!(p.unusable("x", "alice", 100).unwrap().contains("lapsed"));
    }
}
