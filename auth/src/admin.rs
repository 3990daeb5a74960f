//! The admin identity `pctl --data-dir` uses (`<data_dir>/admin.identity`): written once the API
//! listener is bound, reused while it has at least half its lifetime left, and otherwise
//! replaced with the certificate this data directory held revoked, so that at most one is valid
//! per data directory. Only that one: several Auth servers on one PostgreSQL database each keep
//! their own admin identity, and one server's start must not revoke another's.
//!
//! Only the TLS certificate can be revoked (the API checks it against the database); the SSH
//! certificate in the file expires on its own.

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
/// least half its lifetime left and no longer than `ttl` configures.
fn reusable(state: &State, path: &std::path::Path, ttl: u64, now: u64) -> bool {
    let Ok(old) = IdentityFile::load(path) else {
        return false;
    };
    if old.user != ADMIN_USER
        || old.cluster != state.authorities.cluster
        || old.expires < now + ttl / 2
        || old.expires > now + ttl + 60
    {
        return false;
    }
    tls_fingerprint(&old.tls_cert)
        .and_then(|fp| state.backend.cert_owner(&fp).ok().flatten())
        .is_some_and(|(owner, expires)| owner == ADMIN_USER && expires > now)
}

/// Keeps or replaces the admin identity (see the module docs). Returns true if a new one was
/// issued.
pub fn ensure_identity(state: &State, config: &AuthConfig) -> Result<bool, AuthError> {
    let path = config.data_dir.join(files::ADMIN_IDENTITY);
    let ttl = config.admin_identity_ttl_secs;
    let now = mint::now_unix();
    if reusable(state, &path, ttl, now) {
        info!(path = %path.display(), "admin identity still valid: reused");
        return Ok(false);
    }
    // Revoke what this data directory held (if anything), never another server's admin.
    let revoked = match IdentityFile::load(&path)
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
        tls_cas: vec![a.tls_ca_pem.clone()],
        ssh_host_cas: a.host_ca_lines(),
    };
    admin
        .save(&path)
        .map_err(|e| AuthError::Tls(e.to_string()))?;
    info!(path = %path.display(), revoked, "admin identity issued; the certificate this data directory held revoked");
    Ok(true)
}
