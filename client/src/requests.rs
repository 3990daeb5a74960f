//! Access requests from the SDK: ask for roles, review a request, and use an approval by having
//! the caller's certificates reissued with the approved roles (an [`IdentityFile`] an automation
//! connects with, as with any other).

use postern_api::identity::IdentityFile;
use postern_api::proto::{
    AccessRequest, CreateAccessRequestRequest, GetAccessRequestRequest, ListAccessRequestsRequest,
    ReissueUserCertsRequest, ReviewAccessRequestRequest,
};
use russh::keys::ssh_key::LineEnding;

use crate::auth::{AuthClient, AuthClientError};

impl AuthClient {
    /// Asks for `roles` for `duration_secs` (0: one hour, or the roles' `max_duration` if shorter)
    /// for the caller itself; the request starts `pending`.
    pub async fn create_access_request(
        &self,
        roles: &[String],
        reason: &str,
        duration_secs: u64,
    ) -> Result<AccessRequest, AuthClientError> {
        let req = CreateAccessRequestRequest {
            roles: roles.to_vec(),
            reason: reason.into(),
            duration_secs,
        };
        Ok(self.rpc().create_access_request(req).await?.into_inner())
    }

    /// One request: the caller's own, or one it may read or review.
    pub async fn get_access_request(&self, id: &str) -> Result<AccessRequest, AuthClientError> {
        let req = GetAccessRequestRequest { id: id.into() };
        Ok(self.rpc().get_access_request(req).await?.into_inner())
    }

    /// The requests the caller may see, newest first; only those in `state` when it is not empty.
    pub async fn list_access_requests(
        &self,
        state: &str,
    ) -> Result<Vec<AccessRequest>, AuthClientError> {
        let req = ListAccessRequestsRequest {
            state: state.into(),
        };
        Ok(self
            .rpc()
            .list_access_requests(req)
            .await?
            .into_inner()
            .requests)
    }

    /// Approves (`approve`) or denies another user's pending request for roles the caller's roles
    /// may review.
    pub async fn review_access_request(
        &self,
        id: &str,
        approve: bool,
        reason: &str,
    ) -> Result<AccessRequest, AuthClientError> {
        let req = ReviewAccessRequestRequest {
            id: id.into(),
            approve,
            reason: reason.into(),
        };
        Ok(self.rpc().review_access_request(req).await?.into_inner())
    }

    /// Uses the caller's approved request `id` once: a new key and certificates whose roles
    /// include the approved ones, expiring no later than the elevation's end.
    pub async fn reissue_with_request(&self, id: &str) -> Result<IdentityFile, AuthClientError> {
        let key = postern_dial::mint::generate_key();
        let bad = |e: russh::keys::ssh_key::Error| AuthClientError::BadCredentials {
            user: self.user.clone(),
            what: "new key",
            problem: e.to_string(),
        };
        let public_key = key.public_key().to_openssh().map_err(bad)?;
        let req = ReissueUserCertsRequest {
            public_key,
            access_request_id: id.into(),
        };
        let certs = self.rpc().reissue_user_certs(req).await?.into_inner();
        let pem = key.to_openssh(LineEnding::LF).map_err(bad)?.to_string();
        Ok(IdentityFile::from_certs(&self.user, pem, certs))
    }
}

impl AuthClient {
    /// Polls request `id` every `every` until a reviewer has decided it (or it lapses), or
    /// until `timeout`; returns the request as last seen.
    pub async fn wait_for_review(
        &self,
        id: &str,
        every: std::time::Duration,
        timeout: std::time::Duration,
    ) -> Result<AccessRequest, AuthClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let r = self.get_access_request(id).await?;
            let lapsed = r.state == "pending" && r.expires <= postern_dial::mint::now_unix();
            if r.state != "pending" || lapsed || tokio::time::Instant::now() + every > deadline {
                return Ok(r);
            }
            tokio::time::sleep(every).await;
        }
    }
}

/// One line describing a request, as `psh request show` and `pctl requests ls` print it.
pub fn describe(r: &AccessRequest) -> String {
    let now = postern_dial::mint::now_unix();
    let fmt = postern_api::duration::format_secs;
    let when = match r.state.as_str() {
        "pending" if r.expires <= now => "lapsed unreviewed".to_string(),
        "pending" => format!("for {}, awaiting review", fmt(r.duration_secs)),
        "approved" if r.expires <= now => format!("by {}, elevation ended", r.reviewer),
        "approved" => format!(
            "by {}, elevation ends in {} (unix {})",
            r.reviewer,
            fmt(r.expires - now),
            r.expires
        ),
        _ => format!("by {}", r.reviewer),
    };
    let mut line = format!(
        "{}  {}  user={}  roles={}  {when}",
        r.id,
        r.state,
        r.user,
        r.roles.join(",")
    );
    if !r.reason.is_empty() {
        line.push_str(&format!("  reason={:?}", r.reason));
    }
    if !r.review_reason.is_empty() {
        line.push_str(&format!("  review={:?}", r.review_reason));
    }
    line
}
