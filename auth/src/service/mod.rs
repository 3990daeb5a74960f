//! The gRPC service: authentication by client certificate, RBAC on every call, audit of every
//! call, and the operations themselves.
//!
//! ## Layout
//! - this file: the service's state and types, and the `AuthService` trait, whose small calls
//!   are here and whose larger ones hand over to the modules below;
//! - `calls`: the bracket every call runs in (authenticate, authorize, audit) and shared steps;
//! - `roles`, `users`, `hosts` (host certificates, agent registration, join tokens),
//!   `authorities` (CA rotation, exported authorities, the audit log).

use std::net::SocketAddr;
use std::sync::Arc;

use postern_api::proto::auth_service_server::AuthService;
use postern_api::proto::*;
use postern_api::resource;
use russh::keys::ssh_key::PublicKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};
use tracing::error;

use crate::audit::Audit;
use crate::authority::Authorities;
use crate::storage::{Backend, StorageError};

mod authorities;
mod calls;
mod hosts;
mod roles;
mod users;

/// The built-in identity of `<data_dir>/admin.identity` (`pctl --data-dir`): every verb on every
/// resource, like tctl's local mode. Not a user: it cannot be deleted or listed.
pub const ADMIN_USER: &str = "@admin";
/// How a caller without a client certificate is named in the audit log.
pub const ANONYMOUS: &str = "@anonymous";
/// Longest resource name a request may carry, bytes; longer ones are refused (INVALID_ARGUMENT)
/// before anything else, and the audit record keeps only an escaped prefix.
pub const MAX_NAME_BYTES: usize = 256;

fn peer_of<T>(req: &Request<T>) -> String {
    req.extensions()
        .get::<ConnInfo>()
        .map(|i| i.peer.to_string())
        .unwrap_or_default()
}

/// Default and largest lifetimes of host certificates, seconds.
const HOST_TTL_DEFAULT: u64 = 30 * 24 * 3600;
const HOST_TTL_MAX: u64 = 365 * 24 * 3600;
/// Default and largest lifetimes of join tokens and signup secrets, seconds.
const TOKEN_TTL_DEFAULT: u64 = 30 * 60;
const SIGNUP_TTL_DEFAULT: u64 = 3600;
const SECRET_TTL_MAX: u64 = 7 * 24 * 3600;

/// What tonic attaches to every request from a connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The peer's address.
    pub peer: SocketAddr,
    /// SHA-256 (hex) of the client certificate, if one was presented (and verified by TLS).
    pub cert_fingerprint: Option<String>,
    /// The client certificate chains only to the TLS CA a completed rotation retired: every
    /// call is refused, saying so.
    pub retired_ca: bool,
}

/// A user as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredUser {
    /// Role names.
    pub roles: Vec<String>,
    /// Unix seconds.
    pub created: u64,
    /// SHA-256 (hex) of the one-time signup secret, until it is used.
    pub signup_hash: Option<String>,
    /// When the signup secret stops working (unix seconds).
    pub signup_expires: u64,
    /// Argon2id PHC string of the password, once set at the first login.
    #[serde(default)]
    pub password_hash: Option<String>,
}

/// Shared state of the service.
pub struct State {
    /// Storage.
    pub backend: Arc<dyn Backend>,
    /// The cluster's CAs.
    pub authorities: Arc<Authorities>,
    /// The audit log.
    pub audit: Audit,
    /// Open `WatchPolicy` streams, ended together at shutdown.
    pub watches: crate::watch::Watches,
    /// The admin identity file (`pctl --data-dir`), re-issued as a TLS CA rotation moves.
    pub admin_file: Option<crate::admin::AdminFile>,
}

/// The `AuthService` implementation.
#[derive(Clone)]
pub struct Service {
    pub(crate) state: Arc<State>,
}

/// Who is calling.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub(crate) user: String,
    pub(crate) roles: Vec<Role>,
    pub(crate) peer: String,
}

pub(crate) fn storage_status(e: StorageError) -> Status {
    match e {
        StorageError::Exists { .. } => Status::already_exists(e.to_string()),
        StorageError::NotFound { .. } => Status::not_found(e.to_string()),
        StorageError::Conflict { .. } => Status::failed_precondition(e.to_string()),
        other => {
            error!(error = %other, "storage failure");
            Status::unavailable(format!("the Auth server's storage failed: {other}"))
        }
    }
}

fn admin_role() -> Role {
    Role {
        name: ADMIN_USER.into(),
        version: "v7".into(),
        spec: Some(RoleSpec {
            allow: Some(RoleConditions {
                rules: vec![Rule {
                    resources: vec!["*".into()],
                    verbs: vec!["*".into()],
                }],
                ..Default::default()
            }),
            deny: None,
            options: None,
        }),
        revision: 0,
    }
}

/// The preset roles created with the cluster, as in Teleport. Prefer roles of your own that grant
/// only what a caller needs (see the README).
pub fn preset_roles() -> Vec<Role> {
    resource::parse_roles(
        "kind: role
metadata: {name: editor, description: 'Edit roles, users, tokens; issue certificates'}
spec:
  allow:
    rules:
      - resources: ['*']
        verbs: ['*']
version: v7
---
kind: role
metadata: {name: proxy, description: 'A proxy: watch roles, users and locks; read the CAs; write audit events; heartbeat into the proxy set'}
spec:
  allow:
    rules:
      - resources: ['role', 'lock', 'cert_authority']
        verbs: ['list', 'read']
      - resources: ['event']
        verbs: ['create']
      - resources: ['proxy']
        verbs: ['create', 'list']
version: v7
---
kind: role
metadata: {name: access, description: 'Reach nodes; no Auth API resources'}
spec:
  allow:
    logins: ['{{internal.logins}}']
    node_labels:
      '*': '*'
version: v7
",
    )
    .expect("preset roles parse")
}

fn role_from_item(item: &crate::storage::Item) -> Result<Role, Status> {
    let doc: resource::RoleDoc = serde_json::from_str(&item.value)
        .map_err(|e| Status::internal(format!("stored role '{}' is corrupt: {e}", item.name)))?;
    let mut role = resource::from_doc(doc, 0)
        .map_err(|e| Status::internal(format!("stored role '{}' is invalid: {e}", item.name)))?;
    role.revision = item.revision;
    Ok(role)
}

fn role_json(role: &Role) -> String {
    let mut doc = resource::to_doc(role);
    doc.metadata.revision = None;
    serde_json::to_string(&doc).expect("role serializes")
}

pub(crate) fn user_from_item(item: &crate::storage::Item) -> Result<(StoredUser, User), Status> {
    let s: StoredUser = serde_json::from_str(&item.value)
        .map_err(|e| Status::internal(format!("stored user '{}' is corrupt: {e}", item.name)))?;
    let u = User {
        name: item.name.clone(),
        roles: s.roles.clone(),
        created: s.created,
        revision: item.revision,
    };
    Ok((s, u))
}

/// SHA-256 (hex) of a secret, as stored.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn random_secret() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

pub(crate) fn parse_public_key(line: &str) -> Result<PublicKey, Status> {
    let key = PublicKey::from_openssh(line.trim()).map_err(|e| {
        Status::invalid_argument(format!("public_key: not an OpenSSH public key line: {e}"))
    })?;
    if key.key_data().ed25519().is_none() {
        return Err(Status::invalid_argument(format!(
            "public_key: {} keys are not accepted; use ssh-ed25519",
            key.algorithm()
        )));
    }
    Ok(key)
}

fn check_user_name(name: &str) -> Result<(), Status> {
    resource::validate_name(name).map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
    if name.starts_with('@') {
        return Err(Status::invalid_argument(
            "name: names starting with '@' are reserved for built-in identities",
        ));
    }
    Ok(())
}

/// Loads the roles named, skipping missing ones (a deleted role grants nothing).
pub fn load_roles(state: &State, names: &[String]) -> Result<Vec<Role>, Status> {
    let mut roles = Vec::new();
    for n in names {
        if let Some(item) = state.backend.get("role", n).map_err(storage_status)? {
            roles.push(role_from_item(&item)?);
        }
    }
    Ok(roles)
}

/// A requested lifetime, refused (never silently cut) when it exceeds `cap`, naming the cap.
fn ttl_within(requested: u64, cap: u64, what: &str) -> Result<u64, Status> {
    if requested <= cap {
        return Ok(requested);
    }
    Err(Status::invalid_argument(format!(
        "ttl_secs: {} exceeds the cap of {} for {what}: ask for {} or less",
        postern_api::duration::format_secs(requested),
        postern_api::duration::format_secs(cap),
        postern_api::duration::format_secs(cap),
    )))
}

#[tonic::async_trait]
impl AuthService for Service {
    async fn ping(&self, req: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        let caller = self.authenticate(&req).await?;
        let resp = PingResponse {
            cluster: self.state.authorities.cluster.clone(),
            server_version: env!("CARGO_PKG_VERSION").into(),
            user: caller.user.clone(),
            roles: caller.roles.iter().map(|r| r.name.clone()).collect(),
        };
        // Not audited: every client pings when it connects (pctl on each command), so the log
        // would be mostly pings. It reads nothing but the caller's own name and roles; it is
        // still counted in postern_auth_api_calls_total{method="Ping"}.
        let _ = caller;
        Ok(Response::new(resp))
    }

    async fn get_role(&self, req: Request<GetRoleRequest>) -> Result<Response<Role>, Status> {
        self.get_role_rpc(req).await
    }

    async fn list_roles(
        &self,
        req: Request<ListRolesRequest>,
    ) -> Result<Response<ListRolesResponse>, Status> {
        self.list_roles_rpc(req).await
    }

    async fn create_role(&self, req: Request<Role>) -> Result<Response<Role>, Status> {
        self.create_role_rpc(req).await
    }

    async fn update_role(&self, req: Request<Role>) -> Result<Response<Role>, Status> {
        self.update_role_rpc(req).await
    }

    async fn upsert_role(&self, req: Request<Role>) -> Result<Response<Role>, Status> {
        self.upsert_role_rpc(req).await
    }

    async fn delete_role(
        &self,
        req: Request<DeleteRoleRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.delete_role_rpc(req).await
    }

    async fn get_user(&self, req: Request<GetUserRequest>) -> Result<Response<User>, Status> {
        self.get_user_rpc(req).await
    }

    async fn list_users(
        &self,
        req: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        self.list_users_rpc(req).await
    }

    async fn create_user(
        &self,
        req: Request<CreateUserRequest>,
    ) -> Result<Response<CreateUserResponse>, Status> {
        self.create_user_rpc(req).await
    }

    async fn update_user(&self, req: Request<User>) -> Result<Response<User>, Status> {
        self.update_user_rpc(req).await
    }

    async fn delete_user(
        &self,
        req: Request<DeleteUserRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.delete_user_rpc(req).await
    }

    async fn generate_user_certs(
        &self,
        req: Request<GenerateUserCertsRequest>,
    ) -> Result<Response<Certs>, Status> {
        self.generate_user_certs_rpc(req).await
    }

    async fn generate_host_certs(
        &self,
        req: Request<GenerateHostCertsRequest>,
    ) -> Result<Response<Certs>, Status> {
        self.generate_host_certs_rpc(req).await
    }

    async fn register_agent(
        &self,
        req: Request<RegisterAgentRequest>,
    ) -> Result<Response<Certs>, Status> {
        self.register_agent_rpc(req).await
    }

    async fn create_token(
        &self,
        req: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        self.create_token_rpc(req).await
    }

    async fn list_tokens(
        &self,
        req: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        self.list_tokens_rpc(req).await
    }

    async fn delete_token(
        &self,
        req: Request<DeleteTokenRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.delete_token_rpc(req).await
    }

    async fn rotate_cert_authority(
        &self,
        req: Request<RotateCertAuthorityRequest>,
    ) -> Result<Response<CaRotation>, Status> {
        self.rotate_cert_authority_rpc(req).await
    }

    async fn list_ca_rotations(
        &self,
        req: Request<ListCaRotationsRequest>,
    ) -> Result<Response<ListCaRotationsResponse>, Status> {
        self.list_ca_rotations_rpc(req).await
    }

    async fn export_authorities(
        &self,
        req: Request<ExportAuthoritiesRequest>,
    ) -> Result<Response<ExportAuthoritiesResponse>, Status> {
        self.export_authorities_rpc(req).await
    }

    type WatchPolicyStream = crate::watch::EventStream;

    async fn watch_policy(
        &self,
        req: Request<WatchPolicyRequest>,
    ) -> Result<Response<Self::WatchPolicyStream>, Status> {
        self.watch_policy_rpc(req).await
    }

    async fn create_lock(&self, req: Request<Lock>) -> Result<Response<Lock>, Status> {
        self.create_lock_rpc(req).await
    }

    async fn list_locks(
        &self,
        req: Request<ListLocksRequest>,
    ) -> Result<Response<ListLocksResponse>, Status> {
        self.list_locks_rpc(req).await
    }

    async fn delete_lock(
        &self,
        req: Request<DeleteLockRequest>,
    ) -> Result<Response<Empty>, Status> {
        let id = req.get_ref().id.clone();
        self.delete_named(&req, "DeleteLock", "lock", id).await
    }

    async fn emit_stream_events(
        &self,
        req: Request<EmitStreamEventsRequest>,
    ) -> Result<Response<EmitStreamEventsResponse>, Status> {
        self.emit_stream_events_rpc(req).await
    }

    async fn list_stream_events(
        &self,
        req: Request<ListStreamEventsRequest>,
    ) -> Result<Response<ListStreamEventsResponse>, Status> {
        self.list_stream_events_rpc(req).await
    }

    async fn proxy_heartbeat(
        &self,
        req: Request<ProxyHeartbeatRequest>,
    ) -> Result<Response<ProxyHeartbeatResponse>, Status> {
        self.proxy_heartbeat_rpc(req).await
    }

    async fn list_audit_events(
        &self,
        req: Request<ListAuditEventsRequest>,
    ) -> Result<Response<ListAuditEventsResponse>, Status> {
        self.list_audit_events_rpc(req).await
    }

    async fn create_access_request(
        &self,
        req: Request<CreateAccessRequestRequest>,
    ) -> Result<Response<AccessRequest>, Status> {
        self.create_access_request_rpc(req).await
    }

    async fn get_access_request(
        &self,
        req: Request<GetAccessRequestRequest>,
    ) -> Result<Response<AccessRequest>, Status> {
        self.get_access_request_rpc(req).await
    }

    async fn list_access_requests(
        &self,
        req: Request<ListAccessRequestsRequest>,
    ) -> Result<Response<ListAccessRequestsResponse>, Status> {
        self.list_access_requests_rpc(req).await
    }

    async fn review_access_request(
        &self,
        req: Request<ReviewAccessRequestRequest>,
    ) -> Result<Response<AccessRequest>, Status> {
        self.review_access_request_rpc(req).await
    }

    async fn reissue_user_certs(
        &self,
        req: Request<ReissueUserCertsRequest>,
    ) -> Result<Response<Certs>, Status> {
        self.reissue_user_certs_rpc(req).await
    }
}
