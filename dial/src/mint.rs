//! Minting SSH keys and certificates: the Auth server's CAs, `postern-proxy certs ...`, and
//! test fixtures all go through [`issue`].

use std::io::Write;
use std::path::Path;

use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::ssh_key::{Algorithm, Certificate, LineEnding, PrivateKey, PublicKey};
use tunnel_proto::names::{
    EXT_CLUSTER, EXT_ROLE, EXT_ROLES, ROLE_AUTH, ROLE_SERVICE, agent_principal,
};

/// What a certificate is for.
#[derive(Debug, Clone)]
pub enum CertSpec {
    /// The Auth server's own agent's host certificate: principal `<host-id>.<cluster>`, Postern
    /// extensions with role `auth` (it alone may register the reserved targets).
    Agent {
        /// The agent's host id.
        host_id: String,
        /// Its cluster.
        cluster: String,
    },
    /// A service agent's host certificate: as [`CertSpec::Agent`] but role `service`, so the
    /// proxy refuses it the reserved targets (`auth`, `login`).
    ServiceAgent {
        /// The agent's host id.
        host_id: String,
        /// Its cluster.
        cluster: String,
    },
    /// A client's user certificate for the login `user`.
    User {
        /// The user name (principal).
        user: String,
    },
    /// A user certificate that also carries the user's roles in the extension
    /// `postern-roles@postern` (comma-separated), so the proxy decides without a round trip.
    UserWithRoles {
        /// The user name (principal).
        user: String,
        /// Its roles when the certificate was issued.
        roles: Vec<String>,
        /// The access request whose approved roles `roles` include, if any (extension
        /// `postern-request@postern`).
        request: Option<String>,
    },
    /// A proxy's host certificate, listing every name it is dialled by.
    Proxy {
        /// Host names and addresses.
        principals: Vec<String>,
    },
}

/// A minting failure.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// ssh-key refused to build or sign.
    #[error("cannot mint certificate: {0}")]
    Key(#[from] russh::keys::ssh_key::Error),
    /// A private key file could not be used: unreadable, readable by others, or not an OpenSSH
    /// private key.
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    /// A file could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A new Ed25519 key.
pub fn generate_key() -> PrivateKey {
    PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).expect("ed25519 key generation")
}

/// Signs a certificate for `subject` valid from `valid_after` to `valid_before` (unix seconds).
pub fn issue(
    ca: &PrivateKey,
    subject: &PublicKey,
    spec: &CertSpec,
    valid_after: u64,
    valid_before: u64,
) -> Result<Certificate, MintError> {
    let mut b = Builder::new_with_random_nonce(
        &mut rand::rng(),
        subject.key_data().clone(),
        valid_after,
        valid_before,
    )?;
    match spec {
        CertSpec::Agent { host_id, cluster } | CertSpec::ServiceAgent { host_id, cluster } => {
            let role = match spec {
                CertSpec::Agent { .. } => ROLE_AUTH,
                _ => ROLE_SERVICE,
            };
            let principal = agent_principal(host_id, cluster);
            b.cert_type(CertType::Host)?
                .key_id(format!("agent {principal}"))?
                .valid_principal(principal)?
                .extension(EXT_CLUSTER, cluster.clone())?
                .extension(EXT_ROLE, role)?;
        }
        CertSpec::User { user } => {
            b.cert_type(CertType::User)?
                .key_id(format!("user {user}"))?
                .valid_principal(user.clone())?
                // What OpenSSH grants by default; the proxy refuses streams without it.
                .extension("permit-port-forwarding", "")?;
        }
        CertSpec::UserWithRoles {
            user,
            roles,
            request,
        } => {
            b.cert_type(CertType::User)?
                .key_id(format!("user {user}"))?
                .valid_principal(user.clone())?
                .extension("permit-port-forwarding", "")?
                .extension(EXT_ROLES, roles.join(","))?;
            if let Some(id) = request {
                b.extension(tunnel_proto::names::EXT_REQUEST, id.clone())?;
            }
        }
        CertSpec::Proxy { principals } => {
            b.cert_type(CertType::Host)?
                .key_id(format!("proxy {}", principals.join(",")))?;
            for p in principals {
                b.valid_principal(p.clone())?;
            }
        }
    }
    Ok(b.sign(ca)?)
}

/// Current unix time in seconds.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> MintError + '_ {
    move |source| MintError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `contents` to `path` with the given mode, creating the parent directory (0700).
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), MintError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io_err(path))?;
    // The mode of open() only applies to new files: tighten an existing one too.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io_err(path))?;
    f.write_all(contents).map_err(io_err(path))?;
    Ok(())
}

/// Replaces `path` with `contents` atomically: written to a temporary file beside it (mode
/// `mode`), flushed to disk, then renamed over `path`. A failure (a full disk, a file-size
/// limit, a read-only directory) leaves the old file as it was and removes the temporary one.
pub fn write_file_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), MintError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    written.map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        MintError::Io {
            path: path.display().to_string(),
            source,
        }
    })
}

/// Writes a private key (0600) and its `.pub` (0644).
pub fn write_key_pair(path: &Path, key: &PrivateKey) -> Result<(), MintError> {
    let pem = key.to_openssh(LineEnding::LF)?;
    write_file(path, pem.as_bytes(), 0o600)?;
    let public = key.public_key().to_openssh()?;
    write_file(&pub_path(path), format!("{public}\n").as_bytes(), 0o644)
}

/// Writes a certificate in OpenSSH one-line form (0644).
pub fn write_cert(path: &Path, cert: &Certificate) -> Result<(), MintError> {
    write_file(path, format!("{}\n", cert.to_openssh()?).as_bytes(), 0o644)
}

/// `<path>.pub`.
pub fn pub_path(path: &Path) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".pub");
    p.into()
}

/// `<path>-cert.pub`, where OpenSSH looks for a key's certificate.
pub fn cert_path(path: &Path) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push("-cert.pub");
    p.into()
}

/// Why a private key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file cannot be read (missing, no permission, a directory).
    #[error("cannot read private key {path}: {source}")]
    Unreadable {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is readable by group or others.
    #[error("private key {path} has mode {mode:o}, readable by other users: run chmod 600 {path}")]
    LoosePermissions {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The file holds no OpenSSH private key.
    #[error("{path} is not an OpenSSH private key: {detail}")]
    Malformed {
        /// The file.
        path: String,
        /// What ssh-key said.
        detail: String,
    },
}

/// Refuses a private key file readable by group or others (as OpenSSH does). One check for the
/// proxy, the agent and the Auth server.
pub fn check_private_mode(path: &Path) -> Result<(), KeyFileError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|source| KeyFileError::Unreadable {
            path: path.display().to_string(),
            source,
        })?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::LoosePermissions {
            path: path.display().to_string(),
            mode,
        });
    }
    Ok(())
}

/// Reads an OpenSSH private key file after [`check_private_mode`], with an error that says
/// which of the three things went wrong.
pub fn read_key(path: &Path) -> Result<PrivateKey, MintError> {
    check_private_mode(path)?;
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Unreadable {
        path: path.display().to_string(),
        source,
    })?;
    PrivateKey::from_openssh(text.trim()).map_err(|e| {
        MintError::KeyFile(KeyFileError::Malformed {
            path: path.display().to_string(),
            detail: e.to_string(),
        })
    })
}

/// Whether this process runs as root (the owner of `/proc/self` is the effective user).
pub fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}
