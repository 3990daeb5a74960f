//! The access request RPCs, each through the service's one bracket: [`Service::authorize`]
//! (authentication, audited), the request's own checks (a refusal is audited with its reason and
//! returned), then [`Service::finish`] (the outcome audited before the answer leaves).

use postern_api::access;
use postern_api::proto::{
    AccessRequest, Certs, CreateAccessRequestRequest, GetAccessRequestRequest,
    ListAccessRequestsRequest, ListAccessRequestsResponse, ReissueUserCertsRequest,
    ReviewAccessRequestRequest, Role,
};
use postern_api::rbac::{self, Verb};
use postern_api::resource::validate_name;
use postern_dial::mint::now_unix;
use tonic::{Request, Response, Status};
use tracing::info;

use super::{APPROVED, DENIED, KIND, MAX_REASON, MAX_ROLES, PENDING, PENDING_TTL_SECS};
use super::{StoredRequest, load, lock_on, new_id};
use crate::service::{
    Caller, Service, load_roles, parse_public_key, storage_status, user_from_item,
};
use crate::storage::Condition;

fn resource(id: &str) -> String {
    format!("{KIND}/{}", crate::audit::untrusted(id))
}

/// Whether `caller` may see `r` (its own, `access_request: read`, or one it may review).
fn visible(caller: &Caller, r: &StoredRequest) -> bool {
    r.user == caller.user
        || rbac::check(&caller.roles, KIND, Verb::Read).is_ok()
        || access::may_review(&caller.roles, &r.roles).is_ok()
}

fn check_reason(field: &str, reason: &str) -> Result<(), Status> {
    if reason.len() > MAX_REASON {
        return Err(Status::invalid_argument(format!(
            "{field}: at most {MAX_REASON} bytes"
        )));
    }
    Ok(())
}

impl Service {
    /// Audits a refusal of an authenticated caller and returns it.
    async fn refuse(&self, caller: &Caller, action: &str, id: &str, status: Status) -> Status {
        info!(user = %caller.user, action, request = %id, reason = %status.message(), "access request refused");
        let _ = self
            .audit_now(caller, action, resource(id), false, status.message().into())
            .await;
        status
    }

    pub(crate) async fn create_access_request_rpc(
        &self,
        req: Request<CreateAccessRequestRequest>,
    ) -> Result<Response<AccessRequest>, Status> {
        const ACTION: &str = "CreateAccessRequest";
        let caller = self.authorize(&req, ACTION, KIND, "", &[]).await?;
        let r = req.into_inner();
        let id = new_id();
        let mut roles: Vec<String> = Vec::new();
        for role in r.roles.iter().flat_map(|r| r.split(',')).map(str::trim) {
            if !role.is_empty() && !roles.iter().any(|x| x == role) {
                roles.push(role.to_owned());
            }
        }
        let checked = (|| {
            if roles.len() > MAX_ROLES {
                return Err(Status::invalid_argument(format!(
                    "roles: at most {MAX_ROLES}"
                )));
            }
            for role in &roles {
                validate_name(role).map_err(|e| Status::invalid_argument(format!("roles: {e}")))?;
            }
            check_reason("reason", &r.reason)?;
            access::grant(&caller.roles, &roles, r.duration_secs).map_err(Status::permission_denied)
        })();
        let duration = match checked {
            Ok(d) => d,
            Err(s) => return Err(self.refuse(&caller, ACTION, &id, s).await),
        };
        let now = now_unix();
        let stored = StoredRequest {
            user: caller.user.clone(),
            roles: roles.clone(),
            reason: r.reason.trim().to_owned(),
            state: PENDING.into(),
            duration_secs: duration,
            created: now,
            reviewer: String::new(),
            reviewed: 0,
            review_reason: String::new(),
            expires: now + PENDING_TTL_SECS,
            used: 0,
        };
        let result = async {
            let (i, s) = (id.clone(), stored.clone());
            self.blocking(move |st| -> Result<(), Status> {
                for role in &s.roles {
                    if st
                        .backend
                        .get("role", role)
                        .map_err(storage_status)?
                        .is_none()
                    {
                        return Err(Status::invalid_argument(format!(
                            "roles: role '{role}' does not exist"
                        )));
                    }
                }
                let json = serde_json::to_string(&s).expect("request serializes");
                st.backend
                    .put(KIND, &i, &json, Condition::Absent)
                    .map_err(storage_status)?;
                Ok(())
            })
            .await??;
            info!(request = %id, user = %caller.user, roles = ?roles, "access request created");
            Ok(stored.to_proto(&id))
        }
        .await;
        self.finish(&caller, ACTION, resource(&id), result).await
    }

    pub(crate) async fn get_access_request_rpc(
        &self,
        req: Request<GetAccessRequestRequest>,
    ) -> Result<Response<AccessRequest>, Status> {
        const ACTION: &str = "GetAccessRequest";
        let id = req.get_ref().id.clone();
        let caller = self.authorize(&req, ACTION, KIND, &id, &[]).await?;
        let i = id.clone();
        let loaded = self.blocking(move |s| load(s, &i)).await?;
        let result = match loaded {
            Ok((r, _)) if visible(&caller, &r) => Ok(r.to_proto(&id)),
            Ok(_) => {
                let s = Status::permission_denied(format!(
                    "user '{}': access request '{id}' is another user's, and no role you hold grants reading or reviewing it",
                    caller.user
                ));
                return Err(self.refuse(&caller, ACTION, &id, s).await);
            }
            Err(s) => Err(s),
        };
        self.finish(&caller, ACTION, resource(&id), result).await
    }

    pub(crate) async fn list_access_requests_rpc(
        &self,
        req: Request<ListAccessRequestsRequest>,
    ) -> Result<Response<ListAccessRequestsResponse>, Status> {
        const ACTION: &str = "ListAccessRequests";
        let caller = self.authorize(&req, ACTION, KIND, "", &[]).await?;
        let state = req.into_inner().state;
        let result = async {
            let items = self
                .blocking(|s| s.backend.list(KIND))
                .await?
                .map_err(storage_status)?;
            let mut requests = Vec::new();
            for i in items {
                let r: StoredRequest = serde_json::from_str(&i.value)
                    .map_err(|e| Status::internal(format!("stored request corrupt: {e}")))?;
                if visible(&caller, &r) && (state.is_empty() || r.state == state) {
                    requests.push(r.to_proto(&i.name));
                }
            }
            requests.sort_by_key(|r| std::cmp::Reverse(r.created));
            Ok(ListAccessRequestsResponse { requests })
        }
        .await;
        self.finish(&caller, ACTION, KIND.into(), result).await
    }

    pub(crate) async fn review_access_request_rpc(
        &self,
        req: Request<ReviewAccessRequestRequest>,
    ) -> Result<Response<AccessRequest>, Status> {
        let r = req.get_ref().clone();
        let action = if r.approve {
            "ApproveAccessRequest"
        } else {
            "DenyAccessRequest"
        };
        let caller = self.authorize(&req, action, KIND, &r.id, &[]).await?;
        let id = r.id.clone();
        let i = id.clone();
        let (mut stored, rev) = match self.blocking(move |s| load(s, &i)).await? {
            Ok(x) => x,
            Err(s) => return Err(self.refuse(&caller, action, &id, s).await),
        };
        let now = now_unix();
        let refusal = if stored.user == caller.user {
            Some(Status::permission_denied(format!(
                "user '{}': you cannot review your own access request",
                caller.user
            )))
        } else if let Err(e) = access::may_review(&caller.roles, &stored.roles) {
            Some(Status::permission_denied(format!(
                "user '{}': {e}",
                caller.user
            )))
        } else if stored.state != PENDING {
            Some(Status::failed_precondition(format!(
                "access request '{id}' was already {} by '{}'",
                stored.state, stored.reviewer
            )))
        } else if stored.expires <= now {
            Some(Status::failed_precondition(format!(
                "access request '{id}' lapsed unreviewed: the requester must create a new one"
            )))
        } else {
            check_reason("reason", &r.reason).err()
        };
        if let Some(s) = refusal {
            return Err(self.refuse(&caller, action, &id, s).await);
        }
        stored.state = if r.approve { APPROVED } else { DENIED }.into();
        stored.reviewer = caller.user.clone();
        stored.reviewed = now;
        stored.review_reason = r.reason.trim().to_owned();
        if r.approve {
            stored.expires = now + stored.duration_secs;
        }
        let result = async {
            let (i, json) = (id.clone(), serde_json::to_string(&stored).expect("serializes"));
            self.blocking(move |s| s.backend.put(KIND, &i, &json, Condition::Revision(rev)))
                .await?
                .map_err(storage_status)?;
            info!(request = %id, reviewer = %caller.user, state = %stored.state, "access request reviewed");
            Ok(stored.to_proto(&id))
        }
        .await;
        self.finish(&caller, action, resource(&id), result).await
    }

    pub(crate) async fn reissue_user_certs_rpc(
        &self,
        req: Request<ReissueUserCertsRequest>,
    ) -> Result<Response<Certs>, Status> {
        const ACTION: &str = "ReissueUserCerts";
        let id = req.get_ref().access_request_id.clone();
        let caller = self.authorize(&req, ACTION, KIND, &id, &[]).await?;
        let r = req.into_inner();
        let key = match parse_public_key(&r.public_key) {
            Ok(k) => k,
            Err(s) => return Err(self.refuse(&caller, ACTION, &id, s).await),
        };
        let user = caller.user.clone();
        let i = id.clone();
        let authorities = self.state.authorities.clone();
        let issued = self
            .blocking(move |s| -> Result<_, Status> {
                let now = now_unix();
                let (mut stored, rev) = load(s, &i)?;
                if let Some(why) = stored.unusable(&i, &user, now) {
                    return Err(Status::permission_denied(why));
                }
                if stored.used != 0 {
                    return Err(Status::failed_precondition(format!(
                        "access request '{i}' was already used (unix {}): an approval issues certificates once",
                        stored.used
                    )));
                }
                if let Some(msg) = lock_on(s, &user, Some(&i))? {
                    return Err(Status::permission_denied(format!("locked: {msg}")));
                }
                let item = s
                    .backend
                    .get("user", &user)
                    .map_err(storage_status)?
                    .ok_or_else(|| Status::not_found(format!("user '{user}' not found")))?;
                let (standing, _) = user_from_item(&item)?;
                let mut names = standing.roles;
                for role in &stored.roles {
                    if !names.contains(role) {
                        names.push(role.clone());
                    }
                }
                let defs: Vec<Role> = load_roles(s, &names)?;
                let ttl = (stored.expires - now).min(rbac::max_session_ttl(&defs));
                // Marked used first (conditionally): two racing calls cannot both issue.
                stored.used = now;
                let json = serde_json::to_string(&stored).expect("serializes");
                s.backend
                    .put(KIND, &i, &json, Condition::Revision(rev))
                    .map_err(storage_status)?;
                let issued = authorities
                    .issue_user_for_request(&user, &key, ttl, &names, Some(&i))
                    .map_err(|e| Status::internal(e.to_string()))?;
                s.backend
                    .add_elevated_cert(&issued.tls_fingerprint, &user, issued.expires, &i)
                    .map_err(storage_status)?;
                Ok((issued, names))
            })
            .await?;
        let result = match issued {
            Ok((issued, names)) => Ok(self.certs(issued, names)),
            Err(s) if s.code() == tonic::Code::Unavailable => Err(s),
            Err(s) => return Err(self.refuse(&caller, ACTION, &id, s).await),
        };
        self.finish(&caller, ACTION, resource(&id), result).await
    }
}
