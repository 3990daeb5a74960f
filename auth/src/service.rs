//! The gRPC service: authentication by client certificate, RBAC on every call, audit of every
//! call, and the operations themselves.

use std::net::SocketAddr;
use std::sync::Arc;

use postern_api::proto::auth_service_server::AuthService;
use postern_api::proto::*;
use postern_api::rbac::{self, Verb};
use postern_api::resource;
use postern_dial::mint::now_unix;
use russh::keys::ssh_key::PublicKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};
use tracing::{error, info};

use crate::audit::Audit;
use crate::authority::Authorities;
use crate::storage::{AuditRecord, Backend, Condition, StorageError};
use crate::tokens::StoredToken;

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

impl Service {
    /// A service over `state`.
    pub fn new(state: Arc<State>) -> Service {
        Service { state }
    }

    /// Runs `f` on the blocking pool (storage and audit are synchronous).
    pub(crate) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&State) -> T + Send + 'static,
    ) -> Result<T, Status> {
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || f(&state))
            .await
            .map_err(|e| Status::internal(format!("worker failed: {e}")))
    }

    /// Records one call in the audit log before its answer is sent. Err (UNAVAILABLE) when no
    /// sink took the record: the caller fails the call rather than answer it unrecorded.
    pub(crate) async fn audit_now(
        &self,
        caller: &Caller,
        action: &str,
        resource: String,
        allowed: bool,
        error: String,
    ) -> Result<(), Status> {
        let state = self.state.clone();
        let rec = AuditRecord {
            id: 0,
            time_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            user: caller.user.clone(),
            action: action.into(),
            resource,
            allowed,
            error,
            peer: caller.peer.clone(),
        };
        // Recorded before the response is sent: a caller that reads the log sees its call.
        let start = std::time::Instant::now();
        let written = tokio::task::spawn_blocking(move || state.audit.record(rec)).await;
        metrics::histogram!(crate::metrics::AUDIT_WRITE_SECONDS)
            .record(start.elapsed().as_secs_f64());
        written
            .map_err(|e| Status::internal(format!("worker failed: {e}")))?
            .map_err(|e| Status::unavailable(e.to_string()))
    }

    /// Who is calling: the user the client certificate was issued to, still existing.
    async fn authenticate<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let info = req
            .extensions()
            .get::<ConnInfo>()
            .cloned()
            .ok_or_else(|| Status::internal("connection info missing"))?;
        let peer = info.peer.to_string();
        let Some(fp) = info.cert_fingerprint else {
            return Ok(Caller {
                user: ANONYMOUS.into(),
                roles: Vec::new(),
                peer,
            });
        };
        let cluster = self.state.authorities.cluster.clone();
        if info.retired_ca {
            return Err(Status::unauthenticated(format!(
                "this client certificate was issued by a TLS CA of cluster '{cluster}' that a CA rotation retired or rolled back: get a new identity (psh login, pctl auth sign, or let the bot renew)"
            )));
        }
        let (user, roles) = self
            .blocking(move |s| -> Result<(String, Vec<Role>), Status> {
                let (user, expires) = s.backend.cert_owner(&fp).map_err(storage_status)?.ok_or_else(|| {
                    Status::unauthenticated(format!(
                        "this client certificate is not (or no longer) valid in cluster '{cluster}': get a new one with `pctl auth sign`"
                    ))
                })?;
                if expires < now_unix() {
                    return Err(Status::unauthenticated("certificate expired: run psh login (or pctl auth sign) again"));
                }
                if user == ADMIN_USER {
                    return Ok((user, vec![admin_role()]));
                }
                let item = s.backend.get("user", &user).map_err(storage_status)?.ok_or_else(|| {
                    Status::unauthenticated(format!("user '{user}' has been deleted: its certificates no longer work"))
                })?;
                let (stored, _) = user_from_item(&item)?;
                // Locks and an access request's elevation (see `requests`).
                let names = crate::requests::caller_roles(s, &fp, &user, stored.roles)?;
                let roles = load_roles(s, &names)?;
                Ok((user, roles))
            })
            .await??;
        Ok(Caller { user, roles, peer })
    }

    /// Authenticates and checks every verb on `kind`; denials are audited and returned.
    pub(crate) async fn authorize<T>(
        &self,
        req: &Request<T>,
        action: &str,
        kind: &str,
        name: &str,
        verbs: &[Verb],
    ) -> Result<Caller, Status> {
        let resource = if name.is_empty() {
            kind.to_string()
        } else {
            format!("{kind}/{}", crate::audit::untrusted(name))
        };
        if name.len() > MAX_NAME_BYTES {
            let status = Status::invalid_argument(format!(
                "name: at most {MAX_NAME_BYTES} bytes (got {})",
                name.len()
            ));
            let who = Caller {
                user: "@unchecked".into(),
                roles: Vec::new(),
                peer: peer_of(req),
            };
            let _ = self
                .audit_now(&who, action, resource, false, status.message().into())
                .await;
            return Err(status);
        }
        let caller = match self.authenticate(req).await {
            Ok(c) => c,
            Err(status) => {
                let who = Caller {
                    user: "@unknown".into(),
                    roles: Vec::new(),
                    peer: peer_of(req),
                };
                // A denial is returned even when it cannot be recorded (the record then goes to
                // the process log; see `Audit::record`).
                let _ = self
                    .audit_now(&who, action, resource, false, status.message().into())
                    .await;
                return Err(status);
            }
        };
        if caller.user == ANONYMOUS {
            let status = Status::unauthenticated(format!(
                "{action} needs a client certificate issued by cluster '{}' (an identity from `pctl auth sign` or `psh login`)",
                self.state.authorities.cluster
            ));
            let _ = self
                .audit_now(&caller, action, resource, false, status.message().into())
                .await;
            return Err(status);
        }
        for verb in verbs {
            if let Err(denied) = rbac::check(&caller.roles, kind, *verb) {
                let msg = format!("user '{}': {denied}", caller.user);
                info!(user = ?caller.user, action, resource = ?resource, "denied");
                let _ = self
                    .audit_now(&caller, action, resource, false, msg.clone())
                    .await;
                return Err(Status::permission_denied(msg));
            }
        }
        Ok(caller)
    }

    /// Audits an allowed call's outcome and passes it on.
    pub(crate) async fn finish<T>(
        &self,
        caller: &Caller,
        action: &str,
        resource: String,
        result: Result<T, Status>,
    ) -> Result<Response<T>, Status> {
        let error = result
            .as_ref()
            .err()
            .map(|s| s.message().to_string())
            .unwrap_or_default();
        // An allowed call whose record cannot be kept is failed: nothing (a certificate, a
        // listing) leaves the server unrecorded. A write (create, update, upsert, delete) has
        // been applied by now; the message says so.
        if let Err(status) = self.audit_now(caller, action, resource, true, error).await {
            let writes = ["Create", "Update", "Upsert", "Delete"];
            let applied = if result.is_ok() && writes.iter().any(|w| action.starts_with(w)) {
                " (the change itself was applied)"
            } else {
                ""
            };
            return Err(Status::unavailable(format!(
                "{}{applied}",
                status.message()
            )));
        }
        result.map(Response::new)
    }

    /// Deletes resource `kind/name` (`kind: delete`), audited; NOT_FOUND if it is absent.
    pub(crate) async fn delete_named<T>(
        &self,
        req: &Request<T>,
        action: &str,
        kind: &'static str,
        name: String,
    ) -> Result<Response<Empty>, Status> {
        let caller = self
            .authorize(req, action, kind, &name, &[Verb::Delete])
            .await?;
        let n = name.clone();
        let result = async {
            let gone = self
                .blocking(move |s| s.backend.delete(kind, &n))
                .await?
                .map_err(storage_status)?;
            if gone {
                Ok(Empty {})
            } else {
                Err(Status::not_found(format!("{kind} '{name}' not found")))
            }
        }
        .await;
        self.finish(&caller, action, format!("{kind}/{name}"), result)
            .await
    }

    pub(crate) fn certs(&self, issued: crate::authority::Issued, roles: Vec<String>) -> Certs {
        let a = &self.state.authorities;
        Certs {
            cluster: a.cluster.clone(),
            ssh_cert: issued.ssh_cert,
            tls_cert: issued.tls_cert,
            tls_cas: a.tls_ca_pems(),
            ssh_host_cas: a.host_ca_lines(),
            expires: issued.expires,
            roles,
        }
    }

    async fn write_role(
        &self,
        req: Request<Role>,
        action: &str,
        verbs: &[Verb],
        cond: fn(&Role) -> Condition,
    ) -> Result<Response<Role>, Status> {
        let name = req.get_ref().name.clone();
        let caller = self.authorize(&req, action, "role", &name, verbs).await?;
        let role = req.into_inner();
        let result = async {
            if name.starts_with('@') {
                return Err(Status::invalid_argument(
                    "metadata.name: names starting with '@' are reserved",
                ));
            }
            resource::validate_role(&role).map_err(|(field, problem)| {
                Status::invalid_argument(format!("{field}: {problem}"))
            })?;
            let json = role_json(&role);
            let cond = cond(&role);
            let item = self
                .blocking(move |s| s.backend.put("role", &role.name, &json, cond))
                .await?
                .map_err(storage_status)?;
            role_from_item(&item)
        }
        .await;
        self.finish(&caller, action, format!("role/{name}"), result)
            .await
    }
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
        let name = req.get_ref().name.clone();
        let caller = self
            .authorize(&req, "GetRole", "role", &name, &[Verb::Read])
            .await?;
        let n = name.clone();
        let result = async {
            let item = self
                .blocking(move |s| s.backend.get("role", &n))
                .await?
                .map_err(storage_status)?;
            let item = item.ok_or_else(|| Status::not_found(format!("role '{name}' not found")))?;
            role_from_item(&item)
        }
        .await;
        self.finish(
            &caller,
            "GetRole",
            format!("role/{}", req.get_ref().name),
            result,
        )
        .await
    }

    async fn list_roles(
        &self,
        req: Request<ListRolesRequest>,
    ) -> Result<Response<ListRolesResponse>, Status> {
        let caller = self
            .authorize(&req, "ListRoles", "role", "", &[Verb::List])
            .await?;
        let result = async {
            let items = self
                .blocking(|s| s.backend.list("role"))
                .await?
                .map_err(storage_status)?;
            let roles = items
                .iter()
                .map(role_from_item)
                .collect::<Result<Vec<_>, _>>()?;
            Ok(ListRolesResponse { roles })
        }
        .await;
        self.finish(&caller, "ListRoles", "role".into(), result)
            .await
    }

    async fn create_role(&self, req: Request<Role>) -> Result<Response<Role>, Status> {
        self.write_role(req, "CreateRole", &[Verb::Create], |_| Condition::Absent)
            .await
    }

    async fn update_role(&self, req: Request<Role>) -> Result<Response<Role>, Status> {
        self.write_role(req, "UpdateRole", &[Verb::Update], |r| {
            if r.revision > 0 {
                Condition::Revision(r.revision)
            } else {
                Condition::Present
            }
        })
        .await
    }

    async fn upsert_role(&self, req: Request<Role>) -> Result<Response<Role>, Status> {
        self.write_role(req, "UpsertRole", &[Verb::Create, Verb::Update], |_| {
            Condition::Any
        })
        .await
    }

    async fn delete_role(
        &self,
        req: Request<DeleteRoleRequest>,
    ) -> Result<Response<Empty>, Status> {
        let name = req.get_ref().name.clone();
        self.delete_named(&req, "DeleteRole", "role", name).await
    }

    async fn get_user(&self, req: Request<GetUserRequest>) -> Result<Response<User>, Status> {
        let name = req.get_ref().name.clone();
        let caller = self
            .authorize(&req, "GetUser", "user", &name, &[Verb::Read])
            .await?;
        let n = name.clone();
        let result = async {
            let item = self
                .blocking(move |s| s.backend.get("user", &n))
                .await?
                .map_err(storage_status)?;
            let item = item.ok_or_else(|| Status::not_found(format!("user '{name}' not found")))?;
            Ok(user_from_item(&item)?.1)
        }
        .await;
        self.finish(
            &caller,
            "GetUser",
            format!("user/{}", req.get_ref().name),
            result,
        )
        .await
    }

    async fn list_users(
        &self,
        req: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        let caller = self
            .authorize(&req, "ListUsers", "user", "", &[Verb::List])
            .await?;
        let result = async {
            let items = self
                .blocking(|s| s.backend.list("user"))
                .await?
                .map_err(storage_status)?;
            let users = items
                .iter()
                .map(|i| user_from_item(i).map(|u| u.1))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(ListUsersResponse { users })
        }
        .await;
        self.finish(&caller, "ListUsers", "user".into(), result)
            .await
    }

    async fn create_user(
        &self,
        req: Request<CreateUserRequest>,
    ) -> Result<Response<CreateUserResponse>, Status> {
        let name = req.get_ref().name.clone();
        let caller = self
            .authorize(&req, "CreateUser", "user", &name, &[Verb::Create])
            .await?;
        let r = req.into_inner();
        let result = async {
            check_user_name(&r.name)?;
            let ttl = match r.secret_ttl_secs {
                0 => SIGNUP_TTL_DEFAULT,
                t => ttl_within(t, SECRET_TTL_MAX, "a signup secret")?,
            };
            let secret = random_secret();
            let stored = StoredUser {
                roles: r.roles.clone(),
                created: now_unix(),
                signup_hash: Some(hash_secret(&secret)),
                signup_expires: now_unix() + ttl,
                password_hash: None,
            };
            let json = serde_json::to_string(&stored).expect("user serializes");
            let roles = r.roles.clone();
            let n = r.name.clone();
            let item = self
                .blocking(move |s| -> Result<_, Status> {
                    for role in &roles {
                        if s.backend
                            .get("role", role)
                            .map_err(storage_status)?
                            .is_none()
                        {
                            return Err(Status::invalid_argument(format!(
                                "roles: role '{role}' does not exist"
                            )));
                        }
                    }
                    s.backend
                        .put("user", &n, &json, Condition::Absent)
                        .map_err(storage_status)
                })
                .await??;
            Ok(CreateUserResponse {
                user: Some(user_from_item(&item)?.1),
                signup_secret: secret,
                secret_expires: stored.signup_expires,
            })
        }
        .await;
        self.finish(&caller, "CreateUser", format!("user/{name}"), result)
            .await
    }

    async fn update_user(&self, req: Request<User>) -> Result<Response<User>, Status> {
        let name = req.get_ref().name.clone();
        let caller = self
            .authorize(&req, "UpdateUser", "user", &name, &[Verb::Update])
            .await?;
        let u = req.into_inner();
        let result = async {
            check_user_name(&u.name)?;
            let item = self
                .blocking(move |s| -> Result<_, Status> {
                    for role in &u.roles {
                        if s.backend
                            .get("role", role)
                            .map_err(storage_status)?
                            .is_none()
                        {
                            return Err(Status::invalid_argument(format!(
                                "roles: role '{role}' does not exist"
                            )));
                        }
                    }
                    let cur = s
                        .backend
                        .get("user", &u.name)
                        .map_err(storage_status)?
                        .ok_or_else(|| Status::not_found(format!("user '{}' not found", u.name)))?;
                    let (mut stored, _) = user_from_item(&cur)?;
                    stored.roles = u.roles.clone();
                    let json = serde_json::to_string(&stored).expect("user serializes");
                    let rev = if u.revision > 0 {
                        u.revision
                    } else {
                        cur.revision
                    };
                    s.backend
                        .put("user", &u.name, &json, Condition::Revision(rev))
                        .map_err(storage_status)
                })
                .await??;
            Ok(user_from_item(&item)?.1)
        }
        .await;
        self.finish(&caller, "UpdateUser", format!("user/{name}"), result)
            .await
    }

    async fn delete_user(
        &self,
        req: Request<DeleteUserRequest>,
    ) -> Result<Response<Empty>, Status> {
        let name = req.get_ref().name.clone();
        let caller = self
            .authorize(&req, "DeleteUser", "user", &name, &[Verb::Delete])
            .await?;
        let n = name.clone();
        let result = async {
            let gone = self
                .blocking(move |s| -> Result<bool, StorageError> {
                    let gone = s.backend.delete("user", &n)?;
                    s.backend.forget_certs(Some(&n), now_unix())?;
                    Ok(gone)
                })
                .await?
                .map_err(storage_status)?;
            if gone {
                Ok(Empty {})
            } else {
                Err(Status::not_found(format!("user '{name}' not found")))
            }
        }
        .await;
        self.finish(
            &caller,
            "DeleteUser",
            format!("user/{}", req.get_ref().name),
            result,
        )
        .await
    }

    async fn generate_user_certs(
        &self,
        req: Request<GenerateUserCertsRequest>,
    ) -> Result<Response<Certs>, Status> {
        let name = req.get_ref().user.clone();
        // A proxy renews its own Auth identity without `user_cert: create` (see `proxy_renew`).
        let own = match self.authenticate(&req).await {
            Ok(c) if crate::proxy_renew::may_renew_own(&c.user, &c.roles, &name) => Some(c),
            _ => None,
        };
        // A renewal keeps going when the roles' cap has shrunk: it gets the cap.
        let clamp = own.is_some();
        let caller = match own {
            Some(c) => c,
            None => {
                self.authorize(
                    &req,
                    "GenerateUserCerts",
                    "user_cert",
                    &name,
                    &[Verb::Create],
                )
                .await?
            }
        };
        let r = req.into_inner();
        let result = async {
            check_user_name(&r.user)?;
            let key = parse_public_key(&r.public_key)?;
            let authorities = self.state.authorities.clone();
            let (issued, roles) = self
                .blocking(move |s| -> Result<_, Status> {
                    let item = s
                        .backend
                        .get("user", &r.user)
                        .map_err(storage_status)?
                        .ok_or_else(|| Status::not_found(format!("user '{}' not found", r.user)))?;
                    let (stored, _) = user_from_item(&item)?;
                    let roles = load_roles(s, &stored.roles)?;
                    let cap = rbac::max_session_ttl(&roles);
                    let ttl = if r.ttl_secs == 0 || (clamp && r.ttl_secs > cap) {
                        cap
                    } else {
                        ttl_within(
                            r.ttl_secs,
                            cap,
                            "this user's certificates (max_session_ttl of its roles)",
                        )?
                    };
                    let issued = authorities
                        .issue_user(&r.user, &key, ttl, &stored.roles)
                        .map_err(|e| Status::internal(e.to_string()))?;
                    s.backend
                        .add_cert(&issued.tls_fingerprint, &r.user, issued.expires)
                        .map_err(storage_status)?;
                    Ok((issued, stored.roles))
                })
                .await??;
            Ok(self.certs(issued, roles))
        }
        .await;
        self.finish(
            &caller,
            "GenerateUserCerts",
            format!("user_cert/{name}"),
            result,
        )
        .await
    }

    async fn generate_host_certs(
        &self,
        req: Request<GenerateHostCertsRequest>,
    ) -> Result<Response<Certs>, Status> {
        let name = req.get_ref().host_id.clone();
        let caller = self
            .authorize(
                &req,
                "GenerateHostCerts",
                "host_cert",
                &name,
                &[Verb::Create],
            )
            .await?;
        let r = req.into_inner();
        let result = async {
            if r.proxy_principals.is_empty() {
                tunnel_proto::names::validate_label("host_id", &r.host_id)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
            }
            let key = parse_public_key(&r.public_key)?;
            let ttl = match r.ttl_secs {
                0 => HOST_TTL_DEFAULT,
                t => ttl_within(t, HOST_TTL_MAX, "a host certificate")?,
            };
            let a = &self.state.authorities;
            let issued = if r.proxy_principals.is_empty() {
                a.issue_service_agent(&key, &r.host_id, ttl)
            } else {
                a.issue_host(&key, &r.host_id, &r.proxy_principals, ttl)
            }
            .map_err(|e| Status::internal(e.to_string()))?;
            Ok(self.certs(issued, Vec::new()))
        }
        .await;
        self.finish(
            &caller,
            "GenerateHostCerts",
            format!("host_cert/{name}"),
            result,
        )
        .await
    }

    async fn register_agent(
        &self,
        req: Request<RegisterAgentRequest>,
    ) -> Result<Response<Certs>, Status> {
        let peer = req
            .extensions()
            .get::<ConnInfo>()
            .map(|i| i.peer.to_string())
            .unwrap_or_default();
        let r = req.into_inner();
        let hash = hash_secret(r.token.trim());
        let id = hash[..12].to_string();
        let caller = Caller {
            user: format!("@token:{id}"),
            roles: Vec::new(),
            peer,
        };
        let result = async {
            tunnel_proto::names::validate_label("host_id", &r.host_id)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let key = parse_public_key(&r.public_key)?;
            let (i, h) = (id.clone(), hash.clone());
            self.blocking(move |s| {
                crate::tokens::spend(
                    s.backend.as_ref(),
                    &i,
                    &h,
                    now_unix(),
                    crate::tokens::KIND_AGENT,
                )
            })
            .await?
            .map_err(Status::from)?;
            let issued = self
                .state
                .authorities
                .issue_service_agent(&key, &r.host_id, HOST_TTL_DEFAULT)
                .map_err(|e| Status::internal(e.to_string()))?;
            Ok::<_, Status>(self.certs(issued, Vec::new()))
        }
        .await;
        let allowed = result.is_ok();
        self.audit_now(
            &caller,
            "RegisterAgent",
            format!("host_cert/{}", crate::audit::untrusted(&r.host_id)),
            allowed,
            result
                .as_ref()
                .err()
                .map(|s| s.message().to_string())
                .unwrap_or_default(),
        )
        .await?;
        result.map(Response::new)
    }

    async fn create_token(
        &self,
        req: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let caller = self
            .authorize(&req, "CreateToken", "token", "", &[Verb::Create])
            .await?;
        let r = req.into_inner();
        let result = async {
            let user = crate::bot::token_user(self, &r).await?;
            let ttl = match r.ttl_secs {
                0 => TOKEN_TTL_DEFAULT,
                t => ttl_within(t, SECRET_TTL_MAX, "a signup secret")?,
            };
            let secret = random_secret();
            let hash = hash_secret(&secret);
            let uses = match r.uses {
                0 => 1,
                n if n > crate::tokens::MAX_USES => {
                    return Err(Status::invalid_argument(format!(
                        "uses: {n} is more than {} uses for one token",
                        crate::tokens::MAX_USES
                    )));
                }
                n => n,
            };
            let info = Token {
                id: hash[..12].to_string(),
                kind: r.kind.clone(),
                expires: now_unix() + ttl,
                uses_left: uses,
            };
            let stored = StoredToken {
                hash,
                kind: r.kind,
                expires: info.expires,
                uses,
                uses_left: uses,
                user,
            };
            let json = serde_json::to_string(&stored).expect("token serializes");
            let id = info.id.clone();
            self.blocking(move |s| s.backend.put("token", &id, &json, Condition::Absent))
                .await?
                .map_err(storage_status)?;
            Ok(CreateTokenResponse {
                token: secret,
                info: Some(info),
            })
        }
        .await;
        self.finish(&caller, "CreateToken", "token".into(), result)
            .await
    }

    async fn list_tokens(
        &self,
        req: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        let caller = self
            .authorize(&req, "ListTokens", "token", "", &[Verb::List])
            .await?;
        let result = async {
            let items = self
                .blocking(|s| s.backend.list("token"))
                .await?
                .map_err(storage_status)?;
            let mut tokens = Vec::new();
            for i in items {
                let t: StoredToken =
                    serde_json::from_str(&i.value).map_err(|e| Status::internal(e.to_string()))?;
                tokens.push(Token {
                    id: i.name,
                    kind: t.kind,
                    expires: t.expires,
                    uses_left: t.uses_left,
                });
            }
            Ok(ListTokensResponse { tokens })
        }
        .await;
        self.finish(&caller, "ListTokens", "token".into(), result)
            .await
    }

    async fn delete_token(
        &self,
        req: Request<DeleteTokenRequest>,
    ) -> Result<Response<Empty>, Status> {
        let id = req.get_ref().id.clone();
        self.delete_named(&req, "DeleteToken", "token", id).await
    }

    async fn rotate_cert_authority(
        &self,
        req: Request<RotateCertAuthorityRequest>,
    ) -> Result<Response<CaRotation>, Status> {
        let r = req.get_ref().clone();
        let caller = self
            .authorize(
                &req,
                "UpdateCertAuthority",
                "cert_authority",
                &r.kind,
                &[Verb::Update],
            )
            .await?;
        let result = self
            .blocking(move |s| crate::rotation::rotate_rpc(s, &r))
            .await
            .and_then(|x| x);
        let kind = req.get_ref().kind.clone();
        self.finish(
            &caller,
            "UpdateCertAuthority",
            format!("cert_authority/{kind}"),
            result,
        )
        .await
    }

    async fn list_ca_rotations(
        &self,
        req: Request<ListCaRotationsRequest>,
    ) -> Result<Response<ListCaRotationsResponse>, Status> {
        let caller = self
            .authorize(&req, "ListCaRotations", "cert_authority", "", &[Verb::Read])
            .await?;
        let result = self
            .blocking(crate::rotation::list_rpc)
            .await
            .and_then(|x| x);
        self.finish(&caller, "ListCaRotations", "cert_authority".into(), result)
            .await
    }

    async fn export_authorities(
        &self,
        req: Request<ExportAuthoritiesRequest>,
    ) -> Result<Response<ExportAuthoritiesResponse>, Status> {
        let kind = req.get_ref().kind.clone();
        let caller = self
            .authorize(
                &req,
                "ExportAuthorities",
                "cert_authority",
                &kind,
                &[Verb::Read],
            )
            .await?;
        let a = &self.state.authorities;
        let result = match kind.as_str() {
            "host" => Ok((a.host_ca_lines(), a.host_ca_line())),
            "user" => Ok((a.user_ca_lines(), a.user_ca_line())),
            "tls" => {
                // The one signing client certificates is listed first.
                let pems = a.tls_ca_pems();
                let signing = pems.first().cloned().unwrap_or_default();
                Ok((pems, signing))
            }
            other => Err(Status::invalid_argument(format!(
                "kind: '{other}' is not a CA kind (host, user, tls)"
            ))),
        }
        .map(|(entries, signing)| ExportAuthoritiesResponse {
            entries,
            signing,
            server_signing: if kind == "host" {
                a.host_ca_server_line()
            } else {
                String::new()
            },
        });
        self.finish(
            &caller,
            "ExportAuthorities",
            format!("cert_authority/{kind}"),
            result,
        )
        .await
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
        let caller = self
            .authorize(&req, "ListAuditEvents", "event", "", &[Verb::List])
            .await?;
        let limit = match req.get_ref().limit {
            0 => 100,
            n => n.min(10_000),
        };
        let result = async {
            let recs = self
                .blocking(move |s| s.backend.audit(limit))
                .await?
                .map_err(storage_status)?;
            Ok(ListAuditEventsResponse {
                events: recs
                    .into_iter()
                    .map(|r| AuditEvent {
                        id: r.id,
                        time_ms: r.time_ms,
                        user: r.user,
                        action: r.action,
                        resource: r.resource,
                        allowed: r.allowed,
                        error: r.error,
                        peer: r.peer,
                    })
                    .collect(),
            })
        }
        .await;
        self.finish(&caller, "ListAuditEvents", "event".into(), result)
            .await
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
