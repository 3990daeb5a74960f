//! Agent joins and renewals behind the proxy's `POST /webapi/join` and `/webapi/renew`: the
//! login service (target `login`) gets a [`JoinRequest`] line, spends one use of the join token,
//! and answers with a `service` host certificate for the agent's own public key and the host CA
//! it must pin; or a [`RenewRequest`] with the certificate in use, and answers with a new one
//! for the same key unless that certificate is expired, foreign, or its agent locked.

use std::net::SocketAddr;
use std::sync::Arc;

use postern_dial::mint::now_unix;
use russh::keys::ssh_key::{Certificate, PublicKey};
use tunnel_proto::certs::check_agent_cert;
use tunnel_proto::join::{JoinRequest, RenewRequest};
use tunnel_proto::login::LoginResponse;

use crate::audit::untrusted;
use crate::login::Logins;
use crate::service::{State, hash_secret};
use crate::storage::AuditRecord;
use crate::tokens::{KIND_AGENT, TokenError};

/// Lifetime of a joined agent's certificate, seconds (as `RegisterAgent` and `pctl auth sign
/// --host`): 30 days; renewal keeps it fresh.
pub const JOINED_TTL: u64 = 30 * 24 * 3600;

/// Checks a join and issues the certificate (blocking: storage). A refused token is one message
/// that says what to do.
pub fn join(state: &State, req: &JoinRequest, ttl: u64) -> LoginResponse {
    let a = &state.authorities;
    if req.cluster != a.cluster {
        return LoginResponse::failed(
            400,
            format!("this is cluster '{}', not the one asked for", a.cluster),
        );
    }
    if let Err(e) = tunnel_proto::names::validate_label("host id", &req.host_id) {
        return LoginResponse::failed(400, format!("host_id: {e}"));
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
                "CA pin mismatch: this agent's ca_pin is {}, but cluster '{}' has CA pin {pin} (pctl status prints it); the join token was not spent",
                req.ca_pin.chars().take(80).collect::<String>(),
                a.cluster
            ),
        );
    }
    let hash = hash_secret(req.token.trim());
    match crate::tokens::spend(
        state.backend.as_ref(),
        &hash[..12],
        &hash,
        now_unix(),
        KIND_AGENT,
    ) {
        Ok(_) => {}
        Err(TokenError::Storage(e)) => {
            return LoginResponse::failed(503, format!("the Auth server's storage failed: {e}"));
        }
        Err(e) => return LoginResponse::failed(403, e.to_string()),
    }
    let issued = match a.issue_service_agent(&key, &req.host_id, ttl) {
        Ok(i) => i,
        Err(e) => return LoginResponse::failed(500, e.to_string()),
    };
    LoginResponse {
        status: 200,
        cluster: a.cluster.clone(),
        ssh_cert: issued.ssh_cert,
        ssh_host_cas: vec![a.host_ca_line()],
        expires: issued.expires,
        roles: vec![tunnel_proto::names::ROLE_SERVICE.to_string()],
        ..Default::default()
    }
}

/// Renews a `service` agent's certificate for the same key (blocking: storage): the one
/// presented must be valid now, signed by this cluster's host CA, and its agent not locked.
pub fn renew(state: &State, req: &RenewRequest, ttl: u64) -> LoginResponse {
    let a = &state.authorities;
    if req.cluster != a.cluster {
        return LoginResponse::failed(
            400,
            format!("this is cluster '{}', not the one asked for", a.cluster),
        );
    }
    let Ok(cert) = Certificate::from_openssh(req.renew_cert.trim()) else {
        return LoginResponse::failed(400, "renew_cert: not an OpenSSH certificate line");
    };
    let now = now_unix();
    let principal = cert.valid_principals().first().cloned().unwrap_or_default();
    let Some(host_id) = principal
        .strip_suffix(&format!(".{}", a.cluster))
        .map(str::to_owned)
    else {
        return LoginResponse::failed(
            403,
            "renewal refused: the certificate is not for an agent of this cluster",
        );
    };
    let id = match check_agent_cert(&cert, &host_id, &a.cluster, now, &[a.host_ca_fingerprint()]) {
        Ok(id) => id,
        Err(e) => {
            return LoginResponse::failed(
                403,
                format!("renewal refused: {e}; get a new certificate (join with a new token)"),
            );
        }
    };
    if id.role != tunnel_proto::names::ROLE_SERVICE {
        return LoginResponse::failed(
            403,
            "renewal refused: only service agents renew this way (the Auth server renews its own agent)",
        );
    }
    match agent_lock(state, &host_id, now) {
        Ok(Some(message)) => {
            return LoginResponse::failed(
                403,
                format!("renewal refused: agent '{host_id}' is locked: {message}"),
            );
        }
        Ok(None) => {}
        Err(e) => {
            return LoginResponse::failed(503, format!("the Auth server's storage failed: {e}"));
        }
    }
    let key = PublicKey::from(cert.public_key().clone());
    let issued = match a.issue_service_agent(&key, &host_id, ttl) {
        Ok(i) => i,
        Err(e) => return LoginResponse::failed(500, e.to_string()),
    };
    LoginResponse {
        status: 200,
        cluster: a.cluster.clone(),
        ssh_cert: issued.ssh_cert,
        ssh_host_cas: vec![a.host_ca_line()],
        expires: issued.expires,
        roles: vec![tunnel_proto::names::ROLE_SERVICE.to_string()],
        ..Default::default()
    }
}

/// The message of a lock in force on agent `host_id`, if any.
fn agent_lock(state: &State, host_id: &str, now: u64) -> Result<Option<String>, String> {
    for item in state.backend.list("lock").map_err(|e| e.to_string())? {
        let Ok(l) = serde_json::from_str::<crate::locks::StoredLock>(&item.value) else {
            continue;
        };
        if l.agent == host_id && (l.expires == 0 || l.expires > now) {
            return Ok(Some(l.message));
        }
    }
    Ok(None)
}

/// Runs one join and records it in the audit log.
pub async fn answer(logins: &Arc<Logins>, req: JoinRequest, peer: SocketAddr) -> LoginResponse {
    let peer = untrusted(req.source.as_deref().unwrap_or(&peer.to_string()));
    if req.kind == tunnel_proto::join::KIND_BOT {
        return crate::bot::answer_join(logins, req, peer).await;
    }
    let hash = hash_secret(req.token.trim());
    let host_id = untrusted(&req.host_id);
    let (st, ttl) = (logins.state.clone(), logins.agent_ttl);
    let resp = tokio::task::spawn_blocking(move || join(&st, &req, ttl))
        .await
        .unwrap_or_else(|e| LoginResponse::failed(500, e.to_string()));
    let who = (
        format!("@token:{}", &hash[..12]),
        format!("host_cert/{host_id}"),
    );
    record(logins, "JoinAgent", who, peer, resp).await
}

/// Runs one renewal and records it in the audit log.
pub async fn answer_renew(
    logins: &Arc<Logins>,
    req: RenewRequest,
    peer: SocketAddr,
) -> LoginResponse {
    let peer = untrusted(req.source.as_deref().unwrap_or(&peer.to_string()));
    let parsed = Certificate::from_openssh(req.renew_cert.trim()).ok();
    if let Some(cert) = parsed.as_ref().filter(|c| c.cert_type().is_user()) {
        return crate::bot::answer_renew(logins, req.clone(), cert.clone(), peer).await;
    }
    let presented = parsed
        .and_then(|c| c.valid_principals().first().cloned())
        .unwrap_or_else(|| "?".into());
    let (st, ttl) = (logins.state.clone(), logins.agent_ttl);
    let resp = tokio::task::spawn_blocking(move || renew(&st, &req, ttl))
        .await
        .unwrap_or_else(|e| LoginResponse::failed(500, e.to_string()));
    let p = untrusted(&presented);
    let who = (format!("@agent:{p}"), format!("host_cert/{p}"));
    record(logins, "RenewAgent", who, peer, resp).await
}

/// Records `resp` in the audit log: a certificate is never handed out unrecorded.
pub(crate) async fn record(
    logins: &Arc<Logins>,
    action: &'static str,
    (user, resource): (String, String),
    peer: String,
    resp: LoginResponse,
) -> LoginResponse {
    let rec = AuditRecord {
        id: 0,
        time_ms: now_unix() * 1000,
        user,
        action: action.into(),
        resource,
        allowed: resp.error.is_empty(),
        error: resp.error.clone(),
        peer,
    };
    let state = logins.state.clone();
    let recorded = tokio::task::spawn_blocking(move || state.audit.record(rec))
        .await
        .unwrap_or_else(|e| Err(crate::audit::AuditError(e.to_string())));
    tracing::info!(
        action,
        ok = resp.error.is_empty(),
        status = resp.status,
        "agent certificate"
    );
    match recorded {
        Ok(()) => resp,
        Err(e) => LoginResponse::failed(503, format!("not completed: {e}")),
    }
}
