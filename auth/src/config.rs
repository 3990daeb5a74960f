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
    /// Where the cluster's state lives: absent or `"sqlite"` for the embedded database in
    /// `data_dir` (the default); `"postgres://user@host:port/database"` for a PostgreSQL
    /// database that several Auth servers share. Never put the password in the URL.
    pub backend: Option<String>,
    /// A file holding the PostgreSQL password (one line; mode 0600 or stricter). Without it the
    /// password comes from `POSTERN_BACKEND_PASSWORD`, then `PGPASSWORD`, if set.
    pub backend_password_file: Option<PathBuf>,
    /// PEM CA certificate(s) that signed the PostgreSQL server's certificate: set, the connection
    /// uses TLS and verifies the server's chain and host name. Needed with `sslmode=require`.
    pub backend_ca_file: Option<PathBuf>,
    /// The API's listen address. Default `0.0.0.0:3025`.
    pub listen: SocketAddr,
    /// Start even as root (only an SSH service needs root; the Auth server does not).
    pub allow_root: bool,
    /// Lifetime of the admin identity in `<data_dir>/admin.identity`, seconds: written once the
    /// listener is bound, reused while half of it is left, otherwise replaced with the previous
    /// one revoked. Default 30 days.
    pub admin_identity_ttl_secs: u64,
    /// Lifetime of the host certificates agents get by joining with a token and by renewing,
    /// and of the embedded agent's, seconds. Each renews at about two-thirds of it. Default 30
    /// days; at least 5 s.
    pub agent_cert_ttl_secs: u64,
    /// The ops listener (plain HTTP: `/metrics`, `/healthz`, `/readyz`); absent means off (the
    /// counters still run). Keep it on loopback or a firewalled address. `metrics_listen` is
    /// its earlier name; `POSTERN_AUTH_OPS_LISTEN` (or `--ops-listen`) overrides it.
    #[serde(alias = "metrics_listen")]
    pub ops_listen: Option<SocketAddr>,
    /// The reverse tunnel out to a proxy; absent means the API is served on `listen` only.
    pub tunnel: Option<TunnelConfig>,
    /// Limits of the API listener and of logins.
    pub limits: LimitsConfig,
}

/// `[limits]`: what one client, or many, can hold of the Auth server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Password hashes (Argon2id, about 19 MiB of memory each) computed at once. 0 (the default)
    /// means one per CPU core.
    pub max_concurrent_hashes: usize,
    /// Logins waiting for a hashing slot, at most; further ones are answered 503 "busy, retry"
    /// at once. Default 64.
    pub max_queued_logins: usize,
    /// Milliseconds a login waits for a hashing slot before it is answered 503 "busy, retry".
    /// Default 5000 (under the proxy's 15 s relay deadline).
    pub login_queue_timeout_ms: u64,
    /// Failed logins for one user from one source address within `login_failure_window_secs`
    /// before that address is refused for that user (other addresses are not). Default 5.
    pub login_failures_per_source: u32,
    /// The window failed logins are counted in, seconds. Default 300.
    pub login_failure_window_secs: u64,
    /// API connections open at once, TLS handshakes included; more are closed at accept.
    /// Default 1024.
    pub api_max_connections: usize,
    /// API connections open at once from one source address. Default 64.
    pub api_max_connections_per_source: usize,
    /// Addresses `api_max_connections_per_source` does not apply to. Default `127.0.0.1` and
    /// `::1`: the embedded agent dials the API from loopback, so every client that comes through
    /// the proxy shares that address (per-user fairness for them is the proxy's job); they are
    /// held by `api_max_connections` only.
    pub api_per_source_exempt: Vec<std::net::IpAddr>,
    /// Seconds from accept to a finished TLS handshake, and then to the client's first bytes.
    /// Default 10.
    pub api_handshake_timeout_secs: u64,
    /// Seconds an API connection may go without the client sending a byte before it is closed.
    /// The server pings HTTP/2 clients at a third of this (at most every 30 s), so a live client
    /// is never idle.
    /// Default 120.
    pub api_idle_timeout_secs: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_concurrent_hashes: 0,
            max_queued_logins: 64,
            login_queue_timeout_ms: 5000,
            login_failures_per_source: 5,
            login_failure_window_secs: 300,
            api_max_connections: 1024,
            api_max_connections_per_source: 64,
            api_per_source_exempt: vec![
                std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::Ipv6Addr::LOCALHOST.into(),
            ],
            api_handshake_timeout_secs: 10,
            api_idle_timeout_secs: 120,
        }
    }
}

impl LimitsConfig {
    /// Hashing slots: the configured number, or one per core.
    pub fn hash_slots(&self) -> usize {
        if self.max_concurrent_hashes > 0 {
            self.max_concurrent_hashes
        } else {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        }
    }
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
            backend: None,
            backend_password_file: None,
            backend_ca_file: None,
            listen: ([0, 0, 0, 0], tunnel_proto::names::DEFAULT_AUTH_PORT).into(),
            allow_root: false,
            admin_identity_ttl_secs: 30 * 24 * 3600,
            agent_cert_ttl_secs: 30 * 24 * 3600,
            ops_listen: None,
            tunnel: None,
            limits: LimitsConfig::default(),
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
    /// A `POSTERN_AUTH_*` environment override held a bad value or named no field.
    #[error(transparent)]
    Env(#[from] postern_ops::overrides::EnvError),
    /// A field holds a bad value.
    #[error("config field {field}: {problem}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
}

/// The prefix of the environment overrides.
pub const ENV_PREFIX: &str = "POSTERN_AUTH_";

impl AuthConfig {
    /// Reads a TOML file (not yet validated).
    pub fn from_file(path: &Path) -> Result<AuthConfig, ConfigError> {
        Ok(Self::read(path)?.0)
    }

    /// The file at `path` (defaults without one) with the `POSTERN_AUTH_*` environment
    /// overrides over it ([`postern_ops::overrides`]), not yet validated.
    pub fn load(path: Option<&Path>) -> Result<AuthConfig, ConfigError> {
        let (config, table) = match path {
            Some(p) => Self::read(p)?,
            None => (AuthConfig::default(), toml::Table::new()),
        };
        Ok(postern_ops::overrides::apply(&table, ENV_PREFIX)?.unwrap_or(config))
    }

    /// The file parsed as a config and as a TOML table.
    fn read(path: &Path) -> Result<(AuthConfig, toml::Table), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let parse = |e: toml::de::Error| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        };
        let config = toml::from_str(&text).map_err(parse)?;
        let table = toml::from_str(&text).map_err(parse)?;
        Ok((config, table))
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
        match self.backend.as_deref() {
            None | Some("sqlite") => {
                if self.backend_password_file.is_some() || self.backend_ca_file.is_some() {
                    return Err(invalid(
                        "backend_password_file",
                        "backend_password_file and backend_ca_file need a postgres:// backend"
                            .into(),
                    ));
                }
            }
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                let pg = crate::storage::postgres::parse_url(url)
                    .map_err(|e| invalid("backend", e.to_string()))?;
                if pg.get_ssl_mode() == tokio_postgres::config::SslMode::Require
                    && self.backend_ca_file.is_none()
                {
                    return Err(invalid(
                        "backend_ca_file",
                        crate::storage::postgres::PostgresConfigError::TlsWithoutCa.to_string(),
                    ));
                }
            }
            Some(other) => {
                return Err(invalid(
                    "backend",
                    // Only the scheme: the rest may hold a password.
                    format!(
                        "'{}:…' is neither \"sqlite\" nor a postgres:// URL",
                        other.split(':').next().unwrap_or_default()
                    ),
                ));
            }
        }
        if !(5..=365 * 24 * 3600).contains(&self.agent_cert_ttl_secs) {
            return Err(ConfigError::Invalid {
                field: "agent_cert_ttl_secs",
                problem: "between 5 s and 365 days".into(),
            });
        }
        if self.admin_identity_ttl_secs < 3600 {
            return Err(invalid(
                "admin_identity_ttl_secs",
                "at least 3600 (an hour)".into(),
            ));
        }
        let l = &self.limits;
        for (field, value, range) in [
            (
                "limits.max_concurrent_hashes",
                l.max_concurrent_hashes as u64,
                0..=256,
            ),
            (
                "limits.max_queued_logins",
                l.max_queued_logins as u64,
                0..=100_000,
            ),
            (
                "limits.login_queue_timeout_ms",
                l.login_queue_timeout_ms,
                1..=14_000,
            ),
            (
                "limits.login_failures_per_source",
                u64::from(l.login_failures_per_source),
                1..=1000,
            ),
            (
                "limits.login_failure_window_secs",
                l.login_failure_window_secs,
                1..=86_400,
            ),
            (
                "limits.api_max_connections",
                l.api_max_connections as u64,
                1..=1_000_000,
            ),
            (
                "limits.api_max_connections_per_source",
                l.api_max_connections_per_source as u64,
                1..=1_000_000,
            ),
            (
                "limits.api_handshake_timeout_secs",
                l.api_handshake_timeout_secs,
                1..=300,
            ),
            (
                "limits.api_idle_timeout_secs",
                l.api_idle_timeout_secs,
                3..=86_400,
            ),
        ] {
            if !range.contains(&value) {
                return Err(invalid(
                    field,
                    format!(
                        "{value} is out of range: must be {}..={}",
                        range.start(),
                        range.end()
                    ),
                ));
            }
        }
        if l.api_max_connections_per_source > l.api_max_connections {
            return Err(invalid(
                "limits.api_max_connections_per_source",
                "must not exceed limits.api_max_connections".into(),
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
