//! The Auth API's hosts and agents: host certificates, agent registration with a join token, and
//! the join tokens themselves. Each call runs in the bracket of `calls` (authenticate, authorize,
//! audit); the `AuthService` trait in `mod.rs` hands it here.

use postern_api::proto::*;
use postern_api::rbac::Verb;
use postern_dial::mint::now_unix;
use tonic::{Request, Response, Status};

use crate::storage::Condition;
use crate::tokens::StoredToken;

use super::*;

impl Service {
    pub(super) async fn generate_host_certs_rpc(
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

    pub(super) async fn register_agent_rpc(
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

    pub(super) async fn create_token_rpc(
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

    pub(super) async fn list_tokens_rpc(
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

    pub(super) async fn delete_token_rpc(
        &self,
        req: Request<DeleteTokenRequest>,
    ) -> Result<Response<Empty>, Status> {
        let id = req.get_ref().id.clone();
        self.delete_named(&req, "DeleteToken", "token", id).await
    }
}
