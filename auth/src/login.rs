//! The login service behind the proxy's `POST /webapi/login`: the Auth server's agent serves it
//! as target `login`. One JSON line in, one JSON line out, per stream.
//!
//! A first login proves the user with the one-time signup secret and sets a password; later
//! logins use the password. Passwords are stored as Argon2id hashes, computed a bounded number at
//! a time ([`HashGate`]). Failed attempts are limited per source address and user
//! ([`Failures`]); the proxy also limits per user and per source address.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::counter;
use postern_api::rbac;
use postern_dial::mint::now_unix;
use russh::keys::ssh_key::PublicKey;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};
use tunnel_proto::login::{LoginRequest, LoginResponse, MAX_LOGIN_BYTES, MAX_USER_LEN};

use crate::audit::untrusted;
use crate::config::LimitsConfig;
use crate::metrics as m;
use crate::service::{State, StoredUser, hash_secret, load_roles};
use crate::storage::{AuditRecord, Condition};
use crate::throttle::{Failures, HashGate};

/// Shortest password accepted.
pub const MIN_PASSWORD_LEN: usize = 12;

/// The one answer to every wrong user, password or secret: an unknown user, a wrong password and
/// a wrong, used or expired signup secret are told apart neither by message nor by timing.
pub const DENIED: &str = "login failed: wrong user, secret or password (a signup secret works once: if yours is used or expired, ask an admin for a new one)";

/// The login service's shared parts.
pub struct Logins {
    /// Storage, CAs, audit.
    pub state: Arc<State>,
    /// Failed logins per (source address, user).
    pub failures: Failures,
    /// Bounds concurrent password hashing.
    pub gate: HashGate,
    /// Lifetime of joined and renewed agent certificates, seconds.
    pub agent_ttl: u64,
}

impl Logins {
    /// The service over `state` with `limits`.
    pub fn new(state: Arc<State>, limits: &LimitsConfig) -> Logins {
        Logins {
            state,
            failures: Failures::new(
                limits.login_failures_per_source,
                Duration::from_secs(limits.login_failure_window_secs),
            ),
            gate: HashGate::new(
                limits.hash_slots(),
                limits.max_queued_logins,
                Duration::from_millis(limits.login_queue_timeout_ms),
            ),
            agent_ttl: crate::join::JOINED_TTL,
        }
    }
}

pub use crate::password::hash_password;

/// A hash of a random password, verified against when there is no real hash to check, so that
/// every refused login costs the same Argon2 work.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        hash_password(&hex::encode(rand::random::<[u8; 16]>())).expect("hashing a random password")
    })
}

/// Verifies `password` against `phc`, or against the dummy hash when there is none (the same
/// work either way); true only for a real match.
fn verify(password: &str, phc: Option<&str>) -> bool {
    match phc {
        Some(h) => crate::password::verify(password, h),
        None => {
            let _ = crate::password::verify(password, dummy_hash());
            false
        }
    }
}

/// The address failures are counted against: the client's address as the proxy saw it, or the
/// peer's when the login did not come through a proxy.
pub fn source_ip(req: &LoginRequest, peer: SocketAddr) -> IpAddr {
    req.source
        .as_deref()
        .and_then(|s| {
            s.parse::<SocketAddr>()
                .map(|a| a.ip())
                .ok()
                .or_else(|| s.parse().ok())
        })
        .unwrap_or(peer.ip())
}

fn throttled(failures: &Failures) -> LoginResponse {
    let mins = failures_window_minutes(failures);
    LoginResponse::failed(
        429,
        format!(
            "too many failed logins for this user from your address: wait {mins} minute(s) (logins from other addresses are not affected)"
        ),
    )
}

fn failures_window_minutes(f: &Failures) -> u64 {
    f.window().as_secs().div_ceil(60).max(1)
}

/// Checks a login and issues certificates (blocking: Argon2 and storage). Every refusal for a
/// wrong user, password or secret is [`DENIED`], after the same Argon2 work.
pub fn login(
    state: &State,
    failures: &Failures,
    source: IpAddr,
    req: LoginRequest,
) -> LoginResponse {
    if req.user.len() > MAX_USER_LEN {
        return LoginResponse::failed(400, format!("user: at most {MAX_USER_LEN} bytes"));
    }
    if let Err(e) = postern_api::resource::validate_name(&req.user) {
        return LoginResponse::failed(400, format!("user: {e}"));
    }
    let a = &state.authorities;
    if req.cluster != a.cluster {
        return LoginResponse::failed(
            400,
            format!("this is cluster '{}', not the one asked for", a.cluster),
        );
    }
    if failures.locked(source, &req.user) {
        return throttled(failures);
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
    if req.secret.is_none() && req.password.is_none() {
        return LoginResponse::failed(
            400,
            "give a password (or, at the first login, the signup secret)",
        );
    }
    let item = match state.backend.get("user", &req.user) {
        Ok(i) => i,
        Err(e) => return LoginResponse::failed(503, format!("storage failed: {e}")),
    };
    let stored = match &item {
        Some(i) => match serde_json::from_str::<StoredUser>(&i.value) {
            Ok(s) => Some(s),
            Err(_) => return LoginResponse::failed(500, "stored user is corrupt"),
        },
        None => None,
    };
    let denied = || {
        failures.fail(source, &req.user);
        LoginResponse::failed(401, DENIED)
    };
    // Exactly one Argon2 verification on every path below, real or dummy.
    let (Some(item), Some(mut stored)) = (item, stored) else {
        let _ = verify(
            req.password
                .as_deref()
                .or(req.secret.as_deref())
                .unwrap_or(""),
            None,
        );
        return denied();
    };
    match (&req.secret, &req.password) {
        (Some(secret), _) => {
            let _ = verify(secret, None);
            let valid = stored.signup_hash.as_deref() == Some(hash_secret(secret.trim()).as_str())
                && stored.signup_expires > now_unix();
            if !valid {
                return denied();
            }
            let Some(pw) = req
                .new_password
                .as_deref()
                .filter(|p| p.chars().count() >= MIN_PASSWORD_LEN)
            else {
                return LoginResponse::failed(
                    400,
                    format!("new_password: at least {MIN_PASSWORD_LEN} characters"),
                );
            };
            let hash = match hash_password(pw) {
                Ok(h) => h,
                Err(e) => return LoginResponse::failed(500, format!("hashing failed: {e}")),
            };
            stored.password_hash = Some(hash);
            stored.signup_hash = None;
            let json = serde_json::to_string(&stored).expect("user serializes");
            // Conditional on the revision read: a secret can be used once, even by racing logins.
            if let Err(e) =
                state
                    .backend
                    .put("user", &req.user, &json, Condition::Revision(item.revision))
            {
                return LoginResponse::failed(
                    409,
                    format!("login raced another change to the user: {e}"),
                );
            }
        }
        (None, Some(pw)) => {
            if !verify(pw, stored.password_hash.as_deref()) {
                return denied();
            }
        }
        (None, None) => unreachable!("checked above"),
    }
    failures.clear(source, &req.user);
    let roles = match load_roles(state, &stored.roles) {
        Ok(r) => r,
        Err(s) => return LoginResponse::failed(500, s.message().to_string()),
    };
    let cap = rbac::max_session_ttl(&roles);
    let ttl = if req.ttl_secs == 0 {
        cap
    } else {
        req.ttl_secs.min(cap)
    };
    let issued = match a.issue_user(&req.user, &key, ttl, &stored.roles) {
        Ok(i) => i,
        Err(e) => return LoginResponse::failed(500, e.to_string()),
    };
    if let Err(e) = state
        .backend
        .add_cert(&issued.tls_fingerprint, &req.user, issued.expires)
    {
        return LoginResponse::failed(503, format!("storage failed: {e}"));
    }
    LoginResponse {
        error: String::new(),
        status: 200,
        cluster: a.cluster.clone(),
        ssh_cert: issued.ssh_cert,
        tls_cert: issued.tls_cert,
        tls_cas: a.tls_ca_pems(),
        ssh_host_cas: a.host_ca_lines(),
        expires: issued.expires,
        roles: stored.roles,
        retry_after_secs: 0,
    }
}

fn result_label(resp: &LoginResponse) -> &'static str {
    match resp.status {
        200 => "ok",
        401 => "refused",
        429 => "throttled",
        503 if resp.retry_after_secs > 0 => "busy",
        400 | 413 => "bad_request",
        _ => "error",
    }
}

/// Runs one parsed login: the throttle, the hashing gate, the check, the audit record.
pub async fn answer(logins: &Arc<Logins>, req: LoginRequest, peer: SocketAddr) -> LoginResponse {
    let source = source_ip(&req, peer);
    let audit_peer = untrusted(req.source.as_deref().unwrap_or(&peer.to_string()));
    let user = req.user.clone();
    // A throttled pair is answered without waiting for a hashing slot.
    let resp = if logins.failures.locked(source, &user) {
        throttled(&logins.failures)
    } else {
        let l = logins.clone();
        match logins
            .gate
            .run(move || login(&l.state, &l.failures, source, req))
            .await
        {
            Ok(resp) => resp,
            Err(busy) => {
                counter!(m::LOGINS, "result" => "busy").increment(1);
                return LoginResponse::busy(busy.retry_after_secs, busy.to_string());
            }
        }
    };
    let st = logins.state.clone();
    let rec = AuditRecord {
        id: 0,
        time_ms: now_unix() * 1000,
        user: untrusted(&user),
        action: "Login".into(),
        resource: format!("user/{}", untrusted(&user)),
        allowed: resp.error.is_empty(),
        error: resp.error.clone(),
        peer: audit_peer,
    };
    let recorded = tokio::task::spawn_blocking(move || st.audit.record(rec))
        .await
        .unwrap_or_else(|e| Err(crate::audit::AuditError(e.to_string())));
    let resp = match recorded {
        Ok(()) => resp,
        // Certificates are never handed out unrecorded.
        Err(e) => LoginResponse::failed(503, format!("login not completed: {e}")),
    };
    counter!(m::LOGINS, "result" => result_label(&resp)).increment(1);
    info!(user = %untrusted(&user), %source, ok = resp.error.is_empty(), status = resp.status, "login");
    resp
}

/// Whether a request line is a JSON object with `key`: an agent's join carries a `token`, a
/// renewal a `renew_cert`; a login neither.
fn has_key(line: &str, key: &str) -> bool {
    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(line)
        .is_ok_and(|m| m.contains_key(key))
}

async fn handle(stream: tokio::net::TcpStream, peer: SocketAddr, logins: Arc<Logins>) {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(r.take(MAX_LOGIN_BYTES as u64));
    let read = reader.read_line(&mut line);
    let resp = match tokio::time::timeout(Duration::from_secs(10), read).await {
        Ok(Ok(n)) if n > 0 && line.ends_with('\n') && has_key(&line, "token") => {
            match serde_json::from_str::<tunnel_proto::join::JoinRequest>(&line) {
                Ok(req) => crate::join::answer(&logins, req, peer).await,
                Err(e) => LoginResponse::failed(400, format!("bad join request: {e}")),
            }
        }
        Ok(Ok(n)) if n > 0 && line.ends_with('\n') && has_key(&line, "renew_cert") => {
            match serde_json::from_str::<tunnel_proto::join::RenewRequest>(&line) {
                Ok(req) => crate::join::answer_renew(&logins, req, peer).await,
                Err(e) => LoginResponse::failed(400, format!("bad renewal request: {e}")),
            }
        }
        Ok(Ok(n)) if n > 0 && line.ends_with('\n') => {
            match serde_json::from_str::<LoginRequest>(&line) {
                Ok(req) => answer(&logins, req, peer).await,
                Err(e) => LoginResponse::failed(400, format!("bad login request: {e}")),
            }
        }
        Ok(Ok(_)) => LoginResponse::failed(400, "login request too large or not one line"),
        Ok(Err(e)) => return debug!(error = %e, "login stream failed"),
        Err(_) => return debug!("login stream timed out"),
    };
    let mut out = serde_json::to_string(&resp).expect("response serializes");
    out.push('\n');
    let _ = w.write_all(out.as_bytes()).await;
    let _ = w.shutdown().await;
}

/// Serves logins on `listener` (loopback; reached through the agent) until `shutdown`.
/// Accept errors back off from 10 ms to 1 s.
pub async fn serve(listener: TcpListener, logins: Arc<Logins>, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let (s, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => { backoff = Duration::from_millis(10); x }
                Err(e) => {
                    debug!(error = %e, "login accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        tokio::spawn(handle(s, peer, logins.clone()));
    }
}
