//! The login service behind the proxy's `POST /webapi/login`: the Auth server's agent serves it
//! as target `login`. One JSON line in, one JSON line out, per stream.
//!
//! A first login proves the user with the one-time signup secret and sets a password; later
//! logins use the password. Passwords are stored as Argon2id hashes. Failed attempts are limited
//! per user (the proxy also limits per user and per source address).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use postern_api::rbac;
use postern_dial::mint::now_unix;
use russh::keys::ssh_key::PublicKey;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};
use tunnel_proto::login::{LoginRequest, LoginResponse, MAX_LOGIN_BYTES};

use crate::service::{State, StoredUser, hash_secret, load_roles};
use crate::storage::{AuditRecord, Condition};

/// Failed logins allowed per user within [`FAILURE_WINDOW`].
pub const MAX_FAILURES: u32 = 5;
/// The window failed logins are counted in.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(300);
/// Shortest password accepted.
pub const MIN_PASSWORD_LEN: usize = 12;

/// Failed attempts per user.
#[derive(Default)]
pub struct Failures(Mutex<HashMap<String, (Instant, u32)>>);

impl Failures {
    fn locked(&self, user: &str) -> bool {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.get(user)
            .is_some_and(|(since, n)| since.elapsed() < FAILURE_WINDOW && *n >= MAX_FAILURES)
    }

    fn fail(&self, user: &str) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let e = m.entry(user.to_string()).or_insert((Instant::now(), 0));
        if e.0.elapsed() >= FAILURE_WINDOW {
            *e = (Instant::now(), 0);
        }
        e.1 += 1;
    }

    fn clear(&self, user: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(user);
    }
}

/// Checks a login and issues certificates (blocking: Argon2 and storage).
pub fn login(state: &State, failures: &Failures, req: LoginRequest) -> LoginResponse {
    let denied = || LoginResponse::failed(401, "login failed: wrong user, secret or password");
    if failures.locked(&req.user) {
        return LoginResponse::failed(429, "too many failed logins for this user: wait 5 minutes");
    }
    let a = &state.authorities;
    if req.cluster != a.cluster {
        return LoginResponse::failed(
            400,
            format!("this is cluster '{}', not '{}'", a.cluster, req.cluster),
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
    let item = match state.backend.get("user", &req.user) {
        Ok(Some(i)) => i,
        Ok(None) => {
            failures.fail(&req.user);
            return denied();
        }
        Err(e) => return LoginResponse::failed(503, format!("storage failed: {e}")),
    };
    let Ok(mut stored) = serde_json::from_str::<StoredUser>(&item.value) else {
        return LoginResponse::failed(500, "stored user is corrupt");
    };
    let argon = Argon2::default();
    match (&req.secret, &req.password) {
        (Some(secret), _) => {
            let valid = stored.signup_hash.as_deref() == Some(hash_secret(secret.trim()).as_str())
                && stored.signup_expires > now_unix();
            if !valid {
                failures.fail(&req.user);
                return LoginResponse::failed(
                    401,
                    "login failed: the signup secret is wrong, used or expired (ask an admin for a new user)",
                );
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
            let hash = match argon.hash_password(pw.as_bytes()) {
                Ok(h) => h.to_string(),
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
            let ok = stored
                .password_hash
                .as_deref()
                .and_then(|h| PasswordHash::new(h).ok())
                .is_some_and(|h| argon.verify_password(pw.as_bytes(), &h).is_ok());
            if !ok {
                failures.fail(&req.user);
                return denied();
            }
        }
        (None, None) => {
            return LoginResponse::failed(
                400,
                "give a password (or, at the first login, the signup secret)",
            );
        }
    }
    failures.clear(&req.user);
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
        tls_cas: vec![a.tls_ca_pem.clone()],
        ssh_host_cas: vec![a.host_ca_line()],
        expires: issued.expires,
        roles: stored.roles,
    }
}

async fn handle(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    state: Arc<State>,
    failures: Arc<Failures>,
) {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(r.take(MAX_LOGIN_BYTES as u64));
    let read = reader.read_line(&mut line);
    let resp = match tokio::time::timeout(Duration::from_secs(10), read).await {
        Ok(Ok(n)) if n > 0 && line.ends_with('\n') => {
            match serde_json::from_str::<LoginRequest>(&line) {
                Ok(req) => {
                    let user = req.user.clone();
                    let source = req.source.clone().unwrap_or_else(|| peer.to_string());
                    let st = state.clone();
                    let who = user.clone();
                    let resp = tokio::task::spawn_blocking(move || {
                        let resp = login(&st, &failures, req);
                        st.audit.record(AuditRecord {
                            id: 0,
                            time_ms: now_unix() * 1000,
                            user: who.clone(),
                            action: "Login".into(),
                            resource: format!("user/{who}"),
                            allowed: resp.error.is_empty(),
                            error: resp.error.clone(),
                            peer: source,
                        });
                        resp
                    })
                    .await
                    .unwrap_or_else(|e| LoginResponse::failed(500, e.to_string()));
                    info!(%user, ok = resp.error.is_empty(), "login");
                    resp
                }
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
pub async fn serve(listener: TcpListener, state: Arc<State>, shutdown: CancellationToken) {
    let failures = Arc::new(Failures::default());
    loop {
        let (s, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        tokio::spawn(handle(s, peer, state.clone(), failures.clone()));
    }
}
