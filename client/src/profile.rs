//! The profile `psh login` writes: `profile.toml` (proxy, how its web certificate is trusted,
//! user, cluster, roles) and `identity` (an identity file, 0600) in one directory, by default
//! `$POSTERN_HOME` or `~/.postern`; and the same key and certificate in OpenSSH's formats under
//! `keys/` (`id`, `id-cert.pub`, and `known_hosts` trusting the cluster's host CA), so that plain
//! `ssh`, `scp` and `rsync` can use them (`psh config`).

use std::path::{Path, PathBuf};

use postern_api::identity::{IdentityFile, write_private_atomic};
use postern_dial::web::WebTrust;
use serde::{Deserialize, Serialize};

/// The profile's own settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The proxy's web address.
    pub proxy: String,
    /// SHA-256 pin of the proxy's web certificate, if it was pinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_cert_sha256: Option<String>,
    /// PEM CA file for the proxy's web certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_ca_file: Option<PathBuf>,
    /// Trust any web certificate (set by `psh login --insecure`).
    #[serde(default)]
    pub insecure: bool,
    /// The user.
    pub user: String,
    /// The cluster.
    pub cluster: String,
    /// The user's roles when the certificates were issued.
    #[serde(default)]
    pub roles: Vec<String>,
}

/// A profile that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// No profile in the directory.
    #[error("no profile in {dir}: run psh login --proxy=<web address> --user=<name>")]
    Missing {
        /// The profile directory.
        dir: PathBuf,
    },
    /// A profile file is unreadable or corrupt.
    #[error("profile {path}: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The certificates have expired.
    #[error(
        "certificate expired: run psh login (profile of '{user}' at {proxy} expired at {expires})"
    )]
    Expired {
        /// The user.
        user: String,
        /// The proxy.
        proxy: String,
        /// Unix seconds.
        expires: u64,
    },
}

impl Profile {
    /// The default profile directory: `$POSTERN_HOME`, else `$HOME/.postern`.
    pub fn default_dir() -> PathBuf {
        if let Some(d) = std::env::var_os("POSTERN_HOME") {
            return d.into();
        }
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| ".".into());
        home.join(".postern")
    }

    /// How the proxy's web certificate is trusted.
    pub fn web_trust(&self) -> Result<WebTrust, String> {
        if let Some(pin) = &self.web_cert_sha256 {
            Ok(WebTrust::Pin(pin.clone()))
        } else if let Some(f) = &self.web_ca_file {
            WebTrust::roots_from_pem_file(f).map_err(|e| e.to_string())
        } else if self.insecure {
            Ok(WebTrust::Insecure)
        } else {
            crate::credentials::system_roots()
        }
    }

    /// Reads the profile and its identity from `dir` (expired ones are refused).
    pub fn load(dir: &Path) -> Result<(Profile, IdentityFile), ProfileError> {
        let path = dir.join("profile.toml");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ProfileError::Missing { dir: dir.into() });
            }
            Err(e) => {
                return Err(ProfileError::Corrupt {
                    path,
                    message: e.to_string(),
                });
            }
        };
        let profile: Profile = toml::from_str(&text).map_err(|e| ProfileError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let id_path = dir.join("identity");
        let id = IdentityFile::load(&id_path).map_err(|e| ProfileError::Corrupt {
            path: id_path,
            message: e.to_string(),
        })?;
        if id.expires <= postern_dial::mint::now_unix() {
            return Err(ProfileError::Expired {
                user: profile.user,
                proxy: profile.proxy,
                expires: id.expires,
            });
        }
        Ok((profile, id))
    }

    /// Writes the profile (0600) and its identity (0600) into `dir` (created 0700).
    pub fn save(&self, dir: &Path, id: &IdentityFile) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        id.save(&dir.join("identity"))
            .map_err(std::io::Error::other)?;
        let keys = OpenSshFiles::in_dir(dir);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir.join("keys"))?;
        write_private_atomic(&keys.key, id.private_key.as_bytes())?;
        write_private_atomic(
            &keys.cert,
            format!("{}\n", id.ssh_cert.trim_end()).as_bytes(),
        )?;
        write_private_atomic(&keys.known_hosts, known_hosts(&id.ssh_host_cas).as_bytes())?;
        let text = toml::to_string(self).map_err(std::io::Error::other)?;
        write_private_atomic(&dir.join("profile.toml"), text.as_bytes())
    }

    /// Removes the profile from `dir`; false if there was none.
    pub fn remove(dir: &Path) -> std::io::Result<bool> {
        let mut found = false;
        for f in [
            "profile.toml",
            "identity",
            "keys/id",
            "keys/id-cert.pub",
            "keys/known_hosts",
        ] {
            match std::fs::remove_file(dir.join(f)) {
                Ok(()) => found = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let _ = std::fs::remove_dir(dir.join("keys"));
        Ok(found)
    }
}

/// An OpenSSH `known_hosts` trusting each of `host_cas` (public-key lines) for every host.
pub fn known_hosts(host_cas: &[String]) -> String {
    host_cas
        .iter()
        .map(|ca| format!("@cert-authority * {}\n", ca.trim_end()))
        .collect()
}

/// The profile's key and certificates in OpenSSH's formats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenSshFiles {
    /// The private key (OpenSSH format, 0600).
    pub key: PathBuf,
    /// The user certificate (`ssh -o CertificateFile=`).
    pub cert: PathBuf,
    /// `@cert-authority *` lines for the cluster's host CA (`ssh -o UserKnownHostsFile=`).
    pub known_hosts: PathBuf,
}

impl OpenSshFiles {
    /// Where a profile in `dir` keeps them.
    pub fn in_dir(dir: &Path) -> OpenSshFiles {
        let keys = dir.join("keys");
        OpenSshFiles {
            key: keys.join("id"),
            cert: keys.join("id-cert.pub"),
            known_hosts: keys.join("known_hosts"),
        }
    }
}
