//! The Auth API's users and the certificates a user is issued: create, read, update, delete, sign.
//! Each call runs in the bracket of `calls` (authenticate, authorize, audit); the `AuthService`
//! trait in `mod.rs` hands it here.

use postern_api::proto::*;
use postern_api::rbac::{self, Verb};
use postern_dial::mint::now_unix;
use tonic::{Request, Response, Status};

use crate::storage::{Condition, StorageError};

use super::*;

impl Service {
    pub(super) async fn get_user_rpc(
        &self,
        req: Request<GetUserRequest>,
    ) -> Result<Response<User>, Status> {
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

    pub(super) async fn list_users_rpc(
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

    pub(super) async fn create_user_rpc(
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

    pub(super) async fn update_user_rpc(
        &self,
        req: Request<User>,
    ) -> Result<Response<User>, Status> {
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

    pub(super) async fn delete_user_rpc(
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

    pub(super) async fn generate_user_certs_rpc(
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
}
