//! The agent's configuration (`agent.toml`), validated in one place.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The whole agent configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This agent's host id (its certificate's principal is `<host_id>.<cluster>`).
    pub host_id: String,
    /// The cluster it serves.
    pub cluster: String,
    /// The proxy's web address (`host:port`): the tunnel address is discovered from it.
    #[serde(default)]
    pub proxy: Option<String>,
    /// The proxy's tunnel address, dialled directly (no discovery) when `proxy` is unset.
    #[serde(default)]
    pub tunnel_addr: Option<String>,
    /// How the web listener's TLS certificate is trusted.
    #[serde(default)]
    pub web: WebTrustConfig,
    /// OpenSSH private key file of the agent.
    pub host_key_file: PathBuf,
    /// Its host certificate. Default `<host_key_file>-cert.pub`.
    #[serde(default)]
    pub host_cert_file: Option<PathBuf>,
    /// Host CA public-key lines that sign the proxy's own host certificate.
    #[serde(default)]
    pub proxy_host_ca: Vec<String>,
    /// Plain proxy host keys trusted without a certificate (pinning), as public-key lines.
    #[serde(default)]
    pub proxy_host_keys: Vec<String>,
    /// Targets served: name → local address and labels (`web = "127.0.0.1:8080"` or
    /// `web = { addr = "127.0.0.1:8080", labels = { env = "prod" } }`). The agent dials only
    /// these; roles' `node_labels` match the labels.
    pub targets: BTreeMap<String, Target>,
    /// Seconds between SSH keepalives when the tunnel is quiet. Default 15.
    #[serde(default = "default_keepalive")]
    pub keepalive_interval_secs: u64,
    /// Reconnect back-off.
    #[serde(default)]
    pub reconnect: ReconnectConfig,
    /// The agent pool: a tunnel to every proxy (see [`crate::pool`]).
    #[serde(default)]
    pub pool: crate::pool::PoolConfig,
}

/// One target: where the agent dials it, and the labels roles select it by.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "TargetForm")]
pub struct Target {
    /// The local address the agent dials.
    pub addr: SocketAddr,
    /// `key = value` labels (none by default).
    pub labels: BTreeMap<String, String>,
}

impl From<SocketAddr> for Target {
    fn from(addr: SocketAddr) -> Target {
        Target {
            addr,
            labels: BTreeMap::new(),
        }
    }
}

/// The two ways to write a target in TOML.
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "a \"host:port\" string or { addr = \"host:port\", labels = { key = \"value\" } }"
)]
enum TargetForm {
    /// `web = "127.0.0.1:8080"`.
    Addr(SocketAddr),
    /// `web = { addr = "127.0.0.1:8080", labels = { env = "prod" } }`.
    Full(TargetTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetTable {
    addr: SocketAddr,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

impl From<TargetForm> for Target {
    fn from(f: TargetForm) -> Target {
        match f {
            TargetForm::Addr(addr) => addr.into(),
            TargetForm::Full(t) => Target {
                addr: t.addr,
                labels: t.labels,
            },
        }
    }
}

/// Longest label key or value accepted.
pub const MAX_LABEL_BYTES: usize = 63;

/// Web TLS trust for discovery: exactly one of a pin, a CA file or `insecure`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebTrustConfig {
    /// SHA-256 fingerprint of the proxy's web certificate (the proxy logs it at start).
    pub cert_sha256: Option<String>,
    /// PEM file of CA certificates.
    pub ca_file: Option<PathBuf>,
    /// Trust any certificate (local experiments only).
    #[serde(default)]
    pub insecure: bool,
}

/// Exponential back-off with full jitter: the n-th retry waits a uniform random time in
/// `[0, min(cap, base * 2^n))`. Defaults: base 100 ms, cap 1.5 s, so an agent is back within
/// about 2 s of its proxy's return, while a fleet's reconnects spread over the cap.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconnectConfig {
    /// First back-off ceiling, milliseconds.
    pub base_ms: u64,
    /// Largest back-off ceiling, milliseconds.
    pub cap_ms: u64,
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        ReconnectConfig {
            base_ms: 100,
            cap_ms: 1500,
        }
    }
}

fn default_keepalive() -> u64 {
    15
}

/// A configuration problem, naming the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable file.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Bad TOML or unknown field.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What toml said.
        message: String,
    },
    /// A bad value.
    #[error("config field `{field}`: {message}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

impl AgentConfig {
    /// Reads a TOML file (not yet validated).
    pub fn from_file(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        use tunnel_proto::names::{validate_cluster, validate_label};
        validate_label("host id", &self.host_id).map_err(|e| invalid("host_id", e.to_string()))?;
        validate_cluster(&self.cluster).map_err(|e| invalid("cluster", e.to_string()))?;
        match (&self.proxy, &self.tunnel_addr) {
            (None, None) => {
                return Err(invalid(
                    "proxy",
                    "set `proxy` (web address) or `tunnel_addr`",
                ));
            }
            (Some(a), _) | (None, Some(a))
                if tunnel_proto::discovery::split_host_port(a).is_none() =>
            {
                return Err(invalid("proxy", format!("'{a}' is not host:port")));
            }
            _ => {}
        }
        let trusts = [
            self.web.cert_sha256.is_some(),
            self.web.ca_file.is_some(),
            self.web.insecure,
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if self.proxy.is_some() && trusts != 1 {
            return Err(invalid(
                "web",
                "set exactly one of cert_sha256, ca_file or insecure = true",
            ));
        }
        if self.proxy_host_ca.is_empty() && self.proxy_host_keys.is_empty() {
            return Err(invalid(
                "proxy_host_ca",
                "list the host CA that signs the proxy's certificate (or pin proxy_host_keys)",
            ));
        }
        postern_dial::ssh::parse_ca_lines(&self.proxy_host_ca)
            .map_err(|e| invalid("proxy_host_ca", e))?;
        postern_dial::ssh::parse_ca_lines(&self.proxy_host_keys)
            .map_err(|e| invalid("proxy_host_keys", e))?;
        if self.targets.is_empty() {
            return Err(invalid(
                "targets",
                "serve at least one target, e.g. auth = \"127.0.0.1:3025\"",
            ));
        }
        for (name, target) in &self.targets {
            validate_label("target", name).map_err(|e| invalid("targets", e.to_string()))?;
            for (k, v) in &target.labels {
                let ok = |x: &str| {
                    !x.is_empty()
                        && x.len() <= MAX_LABEL_BYTES
                        && x.bytes().all(|b| {
                            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/')
                        })
                };
                if !ok(k) || !ok(v) || k == "*" {
                    return Err(invalid(
                        "targets",
                        format!(
                            "target '{name}': label '{k}' = '{v}': keys and values are 1-63 characters of a-z, A-Z, 0-9, '-', '_', '.', '/'"
                        ),
                    ));
                }
            }
        }
        if self.keepalive_interval_secs == 0 {
            return Err(invalid("keepalive_interval_secs", "must be at least 1"));
        }
        if self.reconnect.base_ms == 0 || self.reconnect.cap_ms < self.reconnect.base_ms {
            return Err(invalid("reconnect", "need 0 < base_ms <= cap_ms"));
        }
        Ok(())
    }

    /// Keepalive interval.
    pub fn keepalive(&self) -> Duration {
        Duration::from_secs(self.keepalive_interval_secs)
    }

    /// Every target's local address (what the tunnel dials).
    pub fn target_addrs(&self) -> BTreeMap<String, SocketAddr> {
        self.targets
            .iter()
            .map(|(n, t)| (n.clone(), t.addr))
            .collect()
    }

    /// Path of the host certificate.
    pub fn host_cert_path(&self) -> PathBuf {
        self.host_cert_file.clone().unwrap_or_else(|| {
            let mut p = self.host_key_file.clone().into_os_string();
            p.push("-cert.pub");
            p.into()
        })
    }
}
