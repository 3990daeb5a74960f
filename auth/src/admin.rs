//! The admin identity `pctl --data-dir` uses (`<data_dir>/admin.identity`): written once the API
//! listener is bound, reused while it has at least half its lifetime left, and otherwise
//! replaced with the certificate this data directory held revoked, so that at most one is valid
//! per data directory. Only that one: several Auth servers on one PostgreSQL database each keep
//! their own admin identity, and one server's start must not revoke another's.
//!
//! Only the TLS certificate can be revoked (the API checks it against the database); the SSH
//! certificate in the file expires on its own.
//!
//! A TLS CA rotation replaces the identity at each change of the trusted TLS CAs or of the one
//! signing client certificates (`init`, `update_clients`, completion, rollback), before the
//! rotation RPC answers, so `pctl --data-dir` keeps working through it.

use std::path::PathBuf;
use std::sync::Mutex;

use postern_api::identity::IdentityFile;
use postern_dial::mint;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tracing::info;

use crate::authority;
use crate::config::AuthConfig;
use crate::server::{AuthError, files};
use crate::service::{ADMIN_USER, State};

/// The SHA-256 of the first certificate in `pem`, as the API records it.
fn tls_fingerprint(pem: &str) -> Option<String> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    Some(authority::fingerprint(&der))
}

/// Whether the identity at `path` can be kept: this cluster's admin, recorded and unrevoked, at
/// least half its lifetime left and no longer than `ttl` configures; with `same_cas`, listing
/// exactly the TLS CAs trusted now, the one signing client certificates first (as identity files
/// issued now do), so that a TLS CA rotation's phases re-issue it.
fn reusable(state: &State, path: &std::path::Path, ttl: u64, now: u64, same_cas: bool) -> bool {
    let Ok(old) = IdentityFile::load(path) else {
        return false;
    };
    if old.user != ADMIN_USER
        || old.cluster != state.authorities.cluster
        || old.expires < now + ttl / 2
        || old.expires > now + ttl + 60
        || (same_cas && old.tls_cas != state.authorities.tls_ca_pems())
    {
        return false;
    }
    tls_fingerprint(&old.tls_cert)
        .and_then(|fp| state.backend.cert_owner(&fp).ok().flatten())
        .is_some_and(|(owner, expires)| owner == ADMIN_USER && expires > now)
}

/// The admin identity file of an Auth server: where it is, how long it lives, and a lock so that
/// two re-issues (a rotation RPC's and the TLS CA change watcher's) do not interleave.
#[derive(Debug)]
pub struct AdminFile {
    /// `<data_dir>/admin.identity`.
    pub path: PathBuf,
    /// `admin_identity_ttl_secs`.
    pub ttl: u64,
    /// Held while the identity is checked and re-issued.
    lock: Mutex<()>,
}

impl AdminFile {
    /// The admin identity file `config` names.
    pub fn new(config: &AuthConfig) -> AdminFile {
        AdminFile {
            path: config.data_dir.join(files::ADMIN_IDENTITY),
            ttl: config.admin_identity_ttl_secs,
            lock: Mutex::new(()),
        }
    }
}

/// Keeps or replaces the admin identity (see the module docs). Returns true if a new one was
/// issued. Once the TLS CA has been rotated, the identity must list the TLS CAs of now (an
/// identity of a cluster whose Ed25519 TLS CA was migrated is kept as it is until then).
pub fn ensure_identity(state: &State, config: &AuthConfig) -> Result<bool, AuthError> {
    let tls = state.authorities.tls_keys();
    let rotated = tls.phase != crate::rotation::Phase::Standby || tls.retired.is_some();
    match &state.admin_file {
        Some(f) => ensure_with(state, f, rotated),
        None => ensure_with(state, &AdminFile::new(config), rotated),
    }
}

/// Re-issues the admin identity if it no longer lists the TLS CAs trusted now (a TLS CA
/// rotation moved). Done by the rotation RPC before it answers, so that the next `pctl
/// --data-dir` finds the new identity, and by [`follow_tls_ca`] for changes made elsewhere.
pub fn follow(state: &State) -> Result<bool, AuthError> {
    match &state.admin_file {
        Some(f) => ensure_with(state, f, true),
        None => Ok(false),
    }
}

fn ensure_with(state: &State, file: &AdminFile, same_cas: bool) -> Result<bool, AuthError> {
    let _one_at_a_time = file.lock.lock().unwrap_or_else(|e| e.into_inner());
    let (path, ttl) = (&file.path, file.ttl);
    let now = mint::now_unix();
    if reusable(state, path, ttl, now, same_cas) {
        info!(path = %path.display(), "admin identity still valid: reused");
        return Ok(false);
    }
    // Revoke what this data directory held (if anything), never another server's admin.
    let revoked = match IdentityFile::load(path)
        .ok()
        .filter(|old| old.user == ADMIN_USER)
        .and_then(|old| tls_fingerprint(&old.tls_cert))
    {
        Some(fp) => state.backend.forget_cert(&fp, now)?,
        None => false,
    };
    let a = &state.authorities;
    let key = mint::generate_key();
    let issued = a.issue_user(ADMIN_USER, key.public_key(), ttl, &[])?;
    state
        .backend
        .add_cert(&issued.tls_fingerprint, ADMIN_USER, issued.expires)?;
    let admin = IdentityFile {
        version: postern_api::identity::IDENTITY_VERSION,
        cluster: a.cluster.clone(),
        user: ADMIN_USER.into(),
        expires: issued.expires,
        private_key: key
            .to_openssh(russh::keys::ssh_key::LineEnding::LF)
            .map_err(|e| AuthError::Tls(e.to_string()))?
            .to_string(),
        ssh_cert: issued.ssh_cert,
        tls_cert: issued.tls_cert,
        tls_cas: a.tls_ca_pems(),
        ssh_host_cas: a.host_ca_lines(),
    };
    admin
        .save(path)
        .map_err(|e| AuthError::Tls(e.to_string()))?;
    info!(path = %path.display(), revoked, "admin identity issued; the certificate this data directory held revoked");
    Ok(true)
}

/// Until `shutdown`: re-checks the admin identity at every TLS CA change (see [`follow`]).
pub async fn follow_tls_ca(
    state: std::sync::Arc<State>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut changes = state.authorities.tls_changes();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
        }
        let st = state.clone();
        match tokio::task::spawn_blocking(move || follow(&st)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "TLS CA changed: the admin identity could not be re-issued")
            }
            Err(e) => tracing::warn!(error = %e, "admin identity task failed"),
        }
    }
}
