//! The bracket every call of the Auth API runs in: who the caller is (its client certificate),
//! whether its roles allow the verb on the resource, and the audit record of the outcome; with
//! the shared steps of the calls (blocking storage work, deleting by name, writing a role,
//! certificates in the answer).

use std::sync::Arc;

use postern_api::proto::*;
use postern_api::rbac::{self, Verb};
use postern_api::resource;
use postern_dial::mint::now_unix;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::storage::{AuditRecord, Condition};

use super::*;

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
    pub(super) async fn authenticate<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
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

    pub(super) async fn write_role(
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
