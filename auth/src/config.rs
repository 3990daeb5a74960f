//! The Auth server's configuration (`auth.toml`): every field defaulted, validated in one place.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use postern_agent::config::WebTrustConfig;
use serde::Deserialize;

/// The whole Auth server configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The cluster's name. Needed at the first start (it is then kept in the database); a later
    /// start with a different name is refused.
    pub cluster: Option<String>,
    /// Database, admin identity, audit log and keys. Default `/var/lib/postern-auth`.
    pub data_dir: PathBuf,
    /// The API's listen address. Default `0.0.0.0:3025`.
    pub listen: SocketAddr,
    /// Start even as root (only an SSH service needs root; the Auth server does not).
    pub allow_root: bool,
    /// Lifetime of the admin identity written to `<data_dir>/admin.identity` at every start,
    /// seconds. Default 30 days.
    pub admin_identity_ttl_secs: u64,
    /// The reverse tunnel out to a proxy; absent means the API is served on `listen` only.
    pub tunnel: Option<TunnelConfig>,
}

/// `[tunnel]`: the embedded agent that dials out to a proxy and serves the API as target `auth`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelConfig {
    /// The proxy's web address (`host:port`); the tunnel address is discovered from it.
    pub proxy: String,
    /// This Auth server's host id in the tunnel login (`<host_id>.<cluster>`). Default `auth`.
    #[serde(default = "default_host_id")]
    pub host_id: String,
    /// How the proxy's web certificate is trusted (a pin, a CA file, or `insecure`).
    #[serde(default)]
    pub web: WebTrustConfig,
    /// Host CA lines that sign the proxy's host certificate. Default: this cluster's own host CA
    /// (`pctl auth sign --proxy=...` issues proxy certificates from it).
    #[serde(default)]
    pub proxy_host_ca: Vec<String>,
    /// Seconds between SSH keepalives on a quiet tunnel. Default 15.
    #[serde(default = "default_keepalive")]
    pub keepalive_interval_secs: u64,
}

fn default_host_id() -> String {
    "auth".into()
}

fn default_keepalive() -> u64 {
    15
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            cluster: None,
            data_dir: PathBuf::from("/var/lib/postern-auth"),
            listen: ([0, 0, 0, 0], tunnel_proto::names::DEFAULT_AUTH_PORT).into(),
            allow_root: false,
            admin_identity_ttl_secs: 30 * 24 * 3600,
            tunnel: None,
        }
    }
}

/// A configuration problem, naming the file or field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Bad TOML or an unknown field.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What toml said (names the field and line).
        message: String,
    },
    /// A field holds a bad value.
    #[error("config field {field}: {problem}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
}

impl AuthConfig {
    /// Reads a TOML file (not yet validated).
    pub fn from_file(path: &Path) -> Result<AuthConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, problem: String| ConfigError::Invalid { field, problem };
        if let Some(c) = &self.cluster {
            tunnel_proto::names::validate_cluster(c)
                .map_err(|e| invalid("cluster", e.to_string()))?;
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "empty".into()));
        }
        if self.admin_identity_ttl_secs < 3600 {
            return Err(invalid(
                "admin_identity_ttl_secs",
                "at least 3600 (an hour)".into(),
            ));
        }
        if let Some(t) = &self.tunnel {
            if t.proxy.trim().is_empty() {
                return Err(invalid(
                    "tunnel.proxy",
                    "empty: give the proxy's web address".into(),
                ));
            }
            tunnel_proto::names::validate_label("host id", &t.host_id)
                .map_err(|e| invalid("tunnel.host_id", e.to_string()))?;
            let pins = [
                t.web.cert_sha256.is_some(),
                t.web.ca_file.is_some(),
                t.web.insecure,
            ];
            if pins.iter().filter(|p| **p).count() != 1 {
                return Err(invalid(
                    "tunnel.web",
                    "set exactly one of cert_sha256, ca_file or insecure".into(),
                ));
            }
            if t.keepalive_interval_secs == 0 {
                return Err(invalid(
                    "tunnel.keepalive_interval_secs",
                    "must be > 0".into(),
                ));
            }
        }
        Ok(())
    }
}
