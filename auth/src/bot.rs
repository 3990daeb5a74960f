//! Machine ID bots behind the proxy's join and renewal relays: a bot token (`pctl tokens add
//! --type=bot --user=NAME`) is bound to one user at creation. A bot's join ([`JoinRequest`] with
//! `kind = "bot"`) spends one use of it and gets that user's identity (SSH and TLS user
//! certificates for the bot's own key) and a bot record for that key; a renewal
//! ([`RenewRequest`] with the bot's SSH user certificate) is answered only for a key with a bot
//! record, a certificate still valid from this cluster's user CA, and a user that still exists
//! and is not locked. A user's own `psh login` certificate has no bot record, so it cannot be
//! renewed this way: only a bot extends its identity without a password.

use std::sync::Arc;

use postern_api::proto::CreateTokenRequest;
use postern_api::rbac;
use postern_dial::mint::now_unix;
use russh::keys::HashAlg;
use russh::keys::ssh_key::{Certificate, PublicKey};
use serde::{Deserialize, Serialize};
use tonic::Status;
use tunnel_proto::certs::check_user_cert;
use tunnel_proto::join::{JoinRequest, RenewRequest};
use tunnel_proto::login::LoginResponse;

use crate::login::Logins;
use crate::service::{Service, State, StoredUser, hash_secret, load_roles, storage_status};
use crate::storage::Condition;
use crate::tokens::{KIND_AGENT, KIND_BOT, TokenError};

/// Storage kind of bot records (one per bot key).
pub const KIND_BOT_KEY: &str = "bot_key";

/// A bot's identity lifetime when it asks for none, seconds (1 hour); capped by its roles.
pub const DEFAULT_BOT_TTL: u64 = 3600;

/// The shortest identity lifetime a bot may ask for, seconds.
pub const MIN_BOT_TTL: u64 = 2;

/// What is stored for a bot's key: the user it acts as and the token that enrolled it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BotRecord {
    /// The user whose identity the bot holds.
    pub user: String,
    /// Id of the token that enrolled it.
    pub token: String,
    /// Unix seconds.
    pub created: u64,
}

/// The name of a key's bot record: hex SHA-256 of the public key.
pub fn key_name(key: &PublicKey) -> String {
    hex::encode(key.fingerprint(HashAlg::Sha256).as_bytes())
}

/// The user a new token is bound to: none for `agent` tokens, an existing user for `bot` tokens.
/// Any other kind, a bot token without a user or an agent token with one is refused.
pub async fn token_user(service: &Service, r: &CreateTokenRequest) -> Result<String, Status> {
    match r.kind.as_str() {
        KIND_AGENT if r.user.is_empty() => Ok(String::new()),
        KIND_AGENT => Err(Status::invalid_argument(
            "user: only a bot token is bound to a user (use --type=bot)",
        )),
        KIND_BOT if r.user.is_empty() => Err(Status::invalid_argument(
            "user: a bot token is bound to a user: give --user=NAME",
        )),
        KIND_BOT => {
            let name = r.user.clone();
            let found = service
                .blocking(move |s| s.backend.get("user", &name))
                .await?
                .map_err(storage_status)?;
            match found {
                Some(_) => Ok(r.user.clone()),
                None => Err(Status::not_found(format!(
                    "user '{}' not found: create it first (pctl users add)",
                    r.user
                ))),
            }
        }
        other => Err(Status::invalid_argument(format!(
            "kind: '{other}' is not a token kind (supported: agent, bot)"
        ))),
    }
}

/// The roles of `user` if it exists and is not locked; else the status and the reason
/// (blocking: storage).
fn live_user(state: &State, user: &str) -> Result<Vec<String>, (u16, String)> {
    let item = match state.backend.get("user", user) {
        Ok(Some(i)) => i,
        Ok(None) => {
            return Err((
                403,
                format!("user '{user}' no longer exists: the bot's identity ends"),
            ));
        }
        Err(e) => return Err((503, format!("storage failed: {e}"))),
    };
    let Ok(stored) = serde_json::from_str::<StoredUser>(&item.value) else {
        return Err((500, "stored user is corrupt".into()));
    };
    match crate::requests::lock_on(state, user, None) {
        Ok(Some(msg)) => Err((403, format!("user '{user}' is locked: {msg}"))),
        Ok(None) => Ok(stored.roles),
        Err(s) => Err((503, s.message().to_string())),
    }
}

/// Issues `user`'s identity for `key` (blocking: storage): lifetime `ttl` (0: the default)
/// capped by the roles' `max_session_ttl`; the TLS certificate is recorded like a login's.
fn issue(
    state: &State,
    user: &str,
    key: &PublicKey,
    ttl: u64,
    roles: Vec<String>,
) -> LoginResponse {
    let a = &state.authorities;
    let loaded = match load_roles(state, &roles) {
        Ok(r) => r,
        Err(s) => return LoginResponse::failed(500, s.message().to_string()),
    };
    let want = if ttl == 0 {
        DEFAULT_BOT_TTL
    } else {
        ttl.max(MIN_BOT_TTL)
    };
    let ttl = want.min(rbac::max_session_ttl(&loaded));
    let issued = match a.issue_user(user, key, ttl, &roles) {
        Ok(i) => i,
        Err(e) => return LoginResponse::failed(500, e.to_string()),
    };
    if let Err(e) = state
        .backend
        .add_cert(&issued.tls_fingerprint, user, issued.expires)
    {
        return LoginResponse::failed(503, format!("storage failed: {e}"));
    }
    LoginResponse {
        status: 200,
        cluster: a.cluster.clone(),
        ssh_cert: issued.ssh_cert,
        tls_cert: issued.tls_cert,
        tls_cas: a.tls_ca_pems(),
        ssh_host_cas: a.host_ca_lines(),
        expires: issued.expires,
        roles,
        ..Default::default()
    }
}

/// A bot's join (blocking: storage): the CA pin, a `bot` token (spent), its user alive; then
/// the bot record for its key and the user's identity.
pub fn join(state: &State, req: &JoinRequest) -> LoginResponse {
    let a = &state.authorities;
    if req.cluster != a.cluster {
        return LoginResponse::failed(
            400,
            format!("this is cluster '{}', not the one asked for", a.cluster),
        );
    }
    let key = match PublicKey::from_openssh(req.public_key.trim()) {
        Ok(k) if k.key_data().ed25519().is_some() => k,
        _ => {
            return LoginResponse::failed(
                400,
                "public_key: not an OpenSSH ssh-ed25519 public key line",
            );
        }
    };
    let pin = a.host_ca_pin();
    if req.ca_pin.trim() != pin {
        return LoginResponse::failed(
            403,
            format!(
                "CA pin mismatch: cluster '{}' has CA pin {pin} (pctl status prints it); the bot token was not spent",
                a.cluster
            ),
        );
    }
    let hash = hash_secret(req.token.trim());
    let id = hash[..12].to_string();
    let token = match crate::tokens::spend(state.backend.as_ref(), &id, &hash, now_unix(), KIND_BOT)
    {
        Ok(t) => t,
        Err(TokenError::Storage(e)) => {
            return LoginResponse::failed(503, format!("the Auth server's storage failed: {e}"));
        }
        Err(e) => return LoginResponse::failed(403, e.to_string()),
    };
    let roles = match live_user(state, &token.user) {
        Ok(r) => r,
        Err((status, why)) => return LoginResponse::failed(status, why),
    };
    let record = BotRecord {
        user: token.user.clone(),
        token: id,
        created: now_unix(),
    };
    let json = serde_json::to_string(&record).expect("bot record serializes");
    if let Err(e) = state
        .backend
        .put(KIND_BOT_KEY, &key_name(&key), &json, Condition::Any)
    {
        return LoginResponse::failed(503, format!("storage failed: {e}"));
    }
    issue(state, &token.user, &key, req.ttl_secs, roles)
}

/// A bot's renewal (blocking: storage): its SSH user certificate valid now from this cluster's
/// user CA, a bot record for its key naming the same user, that user alive and unlocked.
pub fn renew(state: &State, req: &RenewRequest, cert: &Certificate) -> LoginResponse {
    let a = &state.authorities;
    let user = cert.valid_principals().first().cloned().unwrap_or_default();
    let user_cas = a.trusted_fingerprints(crate::rotation::CaKind::User);
    if let Err(e) = check_user_cert(cert, &user, now_unix(), &user_cas) {
        return LoginResponse::failed(
            403,
            format!("renewal refused: {e}; the bot must join again with a new bot token"),
        );
    }
    let key = PublicKey::from(cert.public_key().clone());
    let record = match state.backend.get(KIND_BOT_KEY, &key_name(&key)) {
        Ok(Some(i)) => serde_json::from_str::<BotRecord>(&i.value).ok(),
        Ok(None) => None,
        Err(e) => return LoginResponse::failed(503, format!("storage failed: {e}")),
    };
    if record.is_none_or(|r| r.user != user) {
        return LoginResponse::failed(
            403,
            "renewal refused: this certificate is not a bot's (users renew with psh login)",
        );
    }
    let roles = match live_user(state, &user) {
        Ok(r) => r,
        Err((status, why)) => {
            return LoginResponse::failed(status, format!("renewal refused: {why}"));
        }
    };
    issue(state, &user, &key, req.ttl_secs, roles)
}

/// Runs one bot join and records it in the audit log.
pub async fn answer_join(logins: &Arc<Logins>, req: JoinRequest, peer: String) -> LoginResponse {
    let hash = hash_secret(req.token.trim());
    let name = crate::audit::untrusted(&req.host_id);
    let st = logins.state.clone();
    let resp = tokio::task::spawn_blocking(move || join(&st, &req))
        .await
        .unwrap_or_else(|e| LoginResponse::failed(500, e.to_string()));
    let who = (format!("@token:{}", &hash[..12]), format!("bot/{name}"));
    crate::join::record(logins, "JoinBot", who, peer, resp).await
}

/// Runs one bot renewal and records it in the audit log.
pub async fn answer_renew(
    logins: &Arc<Logins>,
    req: RenewRequest,
    cert: Certificate,
    peer: String,
) -> LoginResponse {
    let user =
        crate::audit::untrusted(&cert.valid_principals().first().cloned().unwrap_or_default());
    let st = logins.state.clone();
    let resp = tokio::task::spawn_blocking(move || renew(&st, &req, &cert))
        .await
        .unwrap_or_else(|e| LoginResponse::failed(500, e.to_string()));
    let who = (user.clone(), format!("bot/{user}"));
    crate::join::record(logins, "RenewBot", who, peer, resp).await
}
