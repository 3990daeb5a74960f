//! The identity file: everything one user (or the Auth server's admin) needs to call the API,
//! directly or through a proxy, in one TOML file written 0600.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The identity file format version this code writes and reads.
pub const IDENTITY_VERSION: u32 = 1;

/// An identity file's contents. `Debug` masks the private key.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFile {
    /// Format version (1).
    pub version: u32,
    /// The cluster that issued it.
    pub cluster: String,
    /// The user it names.
    pub user: String,
    /// Unix seconds after which the certificates are refused.
    pub expires: u64,
    /// OpenSSH private key (Ed25519): signs for both the SSH and the TLS certificate.
    pub private_key: String,
    /// OpenSSH user certificate line, for logging in to proxies.
    pub ssh_cert: String,
    /// PEM TLS client certificate, for the Auth API.
    pub tls_cert: String,
    /// PEM certificates of the cluster's TLS CA (verify the Auth server).
    pub tls_cas: Vec<String>,
    /// OpenSSH public-key lines of the cluster's host CA (verify proxies).
    pub ssh_host_cas: Vec<String>,
}

impl std::fmt::Debug for IdentityFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityFile")
            .field("cluster", &self.cluster)
            .field("user", &self.user)
            .field("expires", &self.expires)
            .field("private_key", &"MASKED")
            .finish_non_exhaustive()
    }
}

/// An identity file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The file cannot be read or written.
    #[error("identity file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Not TOML, truncated, or a field is missing or mistyped.
    #[error("identity file {path} is corrupt or truncated: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the parser said (names the field).
        message: String,
    },
    /// A field holds an unusable value.
    #[error("identity file {path}: {field}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The field.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
}

impl IdentityFile {
    /// The identity for `user` from the certificates the Auth server issued for `private_key`'s
    /// public half (`private_key` in OpenSSH form).
    pub fn from_certs(user: &str, private_key: String, certs: crate::proto::Certs) -> IdentityFile {
        IdentityFile {
            version: IDENTITY_VERSION,
            cluster: certs.cluster,
            user: user.into(),
            expires: certs.expires,
            private_key,
            ssh_cert: certs.ssh_cert,
            tls_cert: certs.tls_cert,
            tls_cas: certs.tls_cas,
            ssh_host_cas: certs.ssh_host_cas,
        }
    }

    /// Parses and checks the text of an identity file (`path` only names it in errors).
    pub fn parse(path: &Path, text: &str) -> Result<IdentityFile, IdentityError> {
        let id: IdentityFile = toml::from_str(text).map_err(|e| IdentityError::Corrupt {
            path: path.into(),
            message: e.to_string(),
        })?;
        let invalid = |field, problem: &str| IdentityError::Invalid {
            path: path.into(),
            field,
            problem: problem.into(),
        };
        if id.version != IDENTITY_VERSION {
            return Err(invalid(
                "version",
                &format!(
                    "version {} is not supported (this build reads 1)",
                    id.version
                ),
            ));
        }
        if id.cluster.is_empty() {
            return Err(invalid("cluster", "empty"));
        }
        if !id
            .private_key
            .contains("-----BEGIN OPENSSH PRIVATE KEY-----")
            || !id.private_key.contains("-----END OPENSSH PRIVATE KEY-----")
        {
            return Err(invalid("private_key", "not a whole OpenSSH private key"));
        }
        if !id.ssh_cert.starts_with("ssh-ed25519-cert-v01@openssh.com ") {
            return Err(invalid(
                "ssh_cert",
                "not an OpenSSH ed25519 certificate line",
            ));
        }
        for (field, pem) in std::iter::once(("tls_cert", &id.tls_cert))
            .chain(id.tls_cas.iter().map(|c| ("tls_cas", c)))
        {
            if !pem.contains("-----BEGIN CERTIFICATE-----")
                || !pem.contains("-----END CERTIFICATE-----")
            {
                return Err(invalid(field, "not a whole PEM certificate"));
            }
        }
        if id.tls_cas.is_empty() {
            return Err(invalid(
                "tls_cas",
                "empty: the Auth server cannot be verified",
            ));
        }
        Ok(id)
    }

    /// Reads and checks an identity file.
    pub fn load(path: &Path) -> Result<IdentityFile, IdentityError> {
        let text = std::fs::read_to_string(path).map_err(|source| IdentityError::Io {
            path: path.into(),
            source,
        })?;
        IdentityFile::parse(path, &text)
    }

    /// The file's text. The names in the heading comment are escaped: a line break or control
    /// character in them would end the comment and break the file.
    pub fn to_toml(&self) -> String {
        format!(
            "# Postern identity file: user '{}' of cluster '{}'. Secret: keep it 0600.\n{}",
            self.user.escape_debug(),
            self.cluster.escape_debug(),
            toml::to_string(self).expect("identity serializes")
        )
    }

    /// Writes the file 0600, atomically (a temporary file renamed over the target), so a
    /// reader never sees half of it.
    pub fn save(&self, path: &Path) -> Result<(), IdentityError> {
        write_private_atomic(path, self.to_toml().as_bytes()).map_err(|source| IdentityError::Io {
            path: path.into(),
            source,
        })
    }
}

/// Writes `bytes` to `path` with mode 0600 through a temporary file and a rename.
pub fn write_private_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_masks_the_private_key() {
        let id = super::IdentityFile {
            version: 1,
            cluster: "c".into(),
            user: "u".into(),
            expires: 0,
            private_key: "-----BEGIN OPENSSH PRIVATE KEY-----secret".into(),
            ssh_cert: String::new(),
            tls_cert: String::new(),
            tls_cas: Vec::new(),
            ssh_host_cas: Vec::new(),
        };
        let shown = format!("{id:?}");
        assert!(
            shown.contains("MASKED") && !shown.contains("secret"),
            "{shown}"
        );
    }

    /// Found by the stable counterpart of the `identity_file` fuzz target: a user or cluster name
    /// with a line break or carriage return ended the heading comment, so the file written did
    /// not read back.
    #[test]
    fn names_with_line_breaks_write_and_read_back() {
        let pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let id = IdentityFile {
            version: 1,
            cluster: "\r\u{2028}".into(),
            user: "a\nb'. Secret".into(),
            expires: 0,
            private_key:
                "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
                    .into(),
            ssh_cert: "ssh-ed25519-cert-v01@openssh.com AAAA".into(),
            tls_cert: pem.into(),
            tls_cas: vec![pem.into()],
            ssh_host_cas: vec![],
        };
        let text = id.to_toml();
        assert_eq!(
            IdentityFile::parse(Path::new("t"), &text).unwrap(),
            id,
            "{text}"
        );
    }
}
