//! Locks: an admin's order that one user, one role or one agent may no longer open streams.
//! Stored as resources of kind `lock` (so they travel in the policy feed); every proxy of the
//! cluster refuses the locked identity's new streams and closes its open ones, with the lock's
//! message as the reason.

use postern_api::proto::Lock;
use serde::{Deserialize, Serialize};
use tonic::Status;

/// Longest lock message, bytes.
pub const MAX_MESSAGE: usize = 1024;
/// Longest lock lifetime: a year (0 means until removed).
pub const MAX_TTL_SECS: u64 = 365 * 24 * 3600;

/// A lock as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredLock {
    /// The locked user, if a user is locked.
    #[serde(default)]
    pub user: String,
    /// The locked role.
    #[serde(default)]
    pub role: String,
    /// The locked agent's host id.
    #[serde(default)]
    pub agent: String,
    /// The locked access request's id: the elevation it granted ends.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub access_request: String,
    /// The reason shown to the locked identity.
    pub message: String,
    /// Unix seconds; 0 means until removed.
    pub expires: u64,
    /// Unix seconds.
    pub created: u64,
    /// Who created it.
    pub created_by: String,
}

impl StoredLock {
    /// The wire form, named `id`.
    pub fn to_proto(&self, id: &str) -> Lock {
        Lock {
            id: id.into(),
            user: self.user.clone(),
            role: self.role.clone(),
            agent: self.agent.clone(),
            message: self.message.clone(),
            expires: self.expires,
            created: self.created,
            created_by: self.created_by.clone(),
            ttl_secs: 0,
            access_request: self.access_request.clone(),
        }
    }
}

/// Checks a `CreateLock` request and builds what is stored: exactly one target, a bounded message
/// (a default one if empty) and lifetime.
pub fn from_request(req: &Lock, caller: &str, now: u64) -> Result<StoredLock, Status> {
    let set = [&req.user, &req.role, &req.agent, &req.access_request]
        .iter()
        .filter(|x| !x.is_empty())
        .count();
    if set != 1 {
        return Err(Status::invalid_argument(
            "lock: set exactly one of user, role, agent or access_request (pctl lock --user=NAME | --role=NAME | --agent=HOST_ID | --request=ID)",
        ));
    }
    if req.message.len() > MAX_MESSAGE {
        return Err(Status::invalid_argument(format!(
            "message: at most {MAX_MESSAGE} bytes"
        )));
    }
    if req.ttl_secs > MAX_TTL_SECS {
        return Err(Status::invalid_argument("ttl_secs: at most a year"));
    }
    let who = if !req.user.is_empty() {
        format!("user '{}'", req.user)
    } else if !req.role.is_empty() {
        format!("role '{}'", req.role)
    } else if !req.access_request.is_empty() {
        format!("access request '{}'", req.access_request)
    } else {
        format!("agent '{}'", req.agent)
    };
    let message = if req.message.trim().is_empty() {
        format!("{who} is locked by an administrator")
    } else {
        req.message.trim().to_string()
    };
    Ok(StoredLock {
        user: req.user.clone(),
        role: req.role.clone(),
        agent: req.agent.clone(),
        access_request: req.access_request.clone(),
        message,
        expires: if req.ttl_secs == 0 {
            0
        } else {
            now + req.ttl_secs
        },
        created: now,
        created_by: caller.into(),
    })
}

/// A new lock id: 16 hex digits.
pub fn new_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

mod rpc {
    use postern_api::proto::{ListLocksRequest, ListLocksResponse, Lock};
    use postern_api::rbac::Verb;
    use postern_dial::mint::now_unix;
    use tonic::{Request, Response, Status};
    use tracing::info;

    use crate::service::{Service, storage_status};
    use crate::storage::Condition;

    impl Service {
        pub(crate) async fn create_lock_rpc(
            &self,
            req: Request<Lock>,
        ) -> Result<Response<Lock>, Status> {
            let caller = self
                .authorize(&req, "CreateLock", "lock", "", &[Verb::Create])
                .await?;
            let id = crate::locks::new_id();
            let result = async {
            let stored = crate::locks::from_request(req.get_ref(), &caller.user, now_unix())?;
            let json = serde_json::to_string(&stored).expect("lock serializes");
            let i = id.clone();
            self.blocking(move |s| s.backend.put("lock", &i, &json, Condition::Absent))
                .await?
                .map_err(storage_status)?;
            info!(lock = %id, user = %stored.user, role = %stored.role, agent = %stored.agent, "lock created");
            Ok(stored.to_proto(&id))
        }
        .await;
            self.finish(&caller, "CreateLock", format!("lock/{id}"), result)
                .await
        }

        pub(crate) async fn list_locks_rpc(
            &self,
            req: Request<ListLocksRequest>,
        ) -> Result<Response<ListLocksResponse>, Status> {
            let caller = self
                .authorize(&req, "ListLocks", "lock", "", &[Verb::List])
                .await?;
            let result = async {
                let items = self
                    .blocking(|s| s.backend.list("lock"))
                    .await?
                    .map_err(storage_status)?;
                let mut locks = Vec::new();
                for i in items {
                    let l: crate::locks::StoredLock = serde_json::from_str(&i.value)
                        .map_err(|e| Status::internal(e.to_string()))?;
                    locks.push(l.to_proto(&i.name));
                }
                Ok(ListLocksResponse { locks })
            }
            .await;
            self.finish(&caller, "ListLocks", "lock".into(), result)
                .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_one_target_and_bounded_fields() {
        let mut l = Lock {
            user: "carol".into(),
            ttl_secs: 3600,
            ..Default::default()
        };
        let s = from_request(&l, "@admin", 100).unwrap();
        assert_eq!(s.expires, 3700);
        assert_eq!(s.message, "user 'carol' is locked by an administrator");
        l.role = "r".into();
        assert!(from_request(&l, "@admin", 100).is_err());
        let none = Lock::default();
        assert!(from_request(&none, "@admin", 100).is_err());
        let long = Lock {
            agent: "a".into(),
            message: "x".repeat(MAX_MESSAGE + 1),
            ..Default::default()
        };
        assert!(from_request(&long, "@admin", 100).is_err());
    }
}
