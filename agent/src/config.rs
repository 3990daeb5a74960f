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
    /// A file holding a join token (`pctl tokens add --type=agent`). When there is no
    /// certificate yet, the agent makes its key, presents the token through the proxy's web
    /// listener, and saves the certificate it gets. Never a command-line argument.
    #[serde(default)]
    pub join_token_file: Option<PathBuf>,
    /// The cluster's CA pin (`sha256:<hex>`, as `pctl status` prints it): a join is refused
    /// unless the host CA that signs the new certificate has this fingerprint. Required with
    /// `join_token_file`.
    #[serde(default)]
    pub ca_pin: Option<String>,
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
    /// Plain-HTTP ops listener (`/metrics`, `/healthz`, `/readyz`); off when unset. Keep it on
    /// loopback or a private network. `POSTERN_AGENT_OPS_LISTEN` overrides it.
    #[serde(default)]
    pub ops_listen: Option<SocketAddr>,
    /// Which transport to dial (QUIC first when the proxy offers it) and the QUIC settings.
    #[serde(default)]
    pub transport: TransportConfig,
}

/// Which transport the agent dials.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportMode {
    /// QUIC when the proxy offers it (or `quic_addr` is set), SSH over TCP when it does not or
    /// when the QUIC handshake does not complete within `quic_handshake_timeout_ms`.
    #[default]
    Auto,
    /// QUIC only, no fallback.
    Quic,
    /// SSH over TCP only.
    Ssh,
}

/// The transport choice and the QUIC transport's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportConfig {
    /// `auto` (default), `quic` or `ssh`.
    pub mode: TransportMode,
    /// The proxy's QUIC address (`host:port`, UDP). Default: from discovery (the tunnel address's
    /// UDP twin); needed to use QUIC when `tunnel_addr` is dialled without discovery.
    pub quic_addr: Option<String>,
    /// Milliseconds for the QUIC handshake before falling back to SSH over TCP. Default 1500.
    pub quic_handshake_timeout_ms: u64,
    /// Milliseconds between QUIC keepalives (one small datagram each, acknowledged by the
    /// proxy). Default 1000. The agent redials when nothing at all has come from the proxy for
    /// four of these intervals (over UDP a dead proxy sends no reset), and a restarted proxy
    /// answers a keepalive with a stateless reset.
    pub quic_keepalive_ms: u64,
    /// Bytes one stream may have in flight toward the agent that the agent has not written to its
    /// target. Default 2 MiB.
    pub quic_stream_window_bytes: u64,
    /// Streams the proxy may have open to this agent at once. Default 10000.
    pub quic_max_streams: u32,
    /// Bytes in flight toward the agent over all streams. At least `quic_max_streams ×
    /// quic_stream_window_bytes` (default: that product), so that streams whose target stopped
    /// reading cannot starve the others.
    pub quic_connection_window_bytes: Option<u64>,
    /// Upper bound of QUIC path MTU discovery, UDP payload bytes, 1200..=6500. Default 1452 (a
    /// 1,500-byte Ethernet path); the larger of the two ends' bounds that the path carries wins.
    pub quic_mtu_upper_bound: u16,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            mode: TransportMode::Auto,
            quic_addr: None,
            quic_handshake_timeout_ms: 1500,
            quic_keepalive_ms: 1000,
            quic_stream_window_bytes: 2 << 20,
            quic_max_streams: 10_000,
            quic_connection_window_bytes: None,
            quic_mtu_upper_bound: tunnel_proto::quic::MTU_UPPER_BOUND_DEFAULT,
        }
    }
}

impl TransportConfig {
    /// The smallest connection window that keeps stalled streams from starving the rest.
    pub fn min_connection_window(&self) -> u64 {
        u64::from(self.quic_max_streams).saturating_mul(self.quic_stream_window_bytes)
    }

    /// The QUIC connection receive window in use.
    pub fn connection_window(&self) -> u64 {
        self.quic_connection_window_bytes
            .unwrap_or_else(|| self.min_connection_window())
    }
}

/// One target: where the agent dials it, and the labels roles select it by.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "TargetForm")]
pub struct Target {
    /// The address the agent dials: an IP or a DNS name, resolved at each dial.
    pub addr: TargetAddr,
    /// `key = value` labels (none by default).
    pub labels: BTreeMap<String, String>,
}

impl From<SocketAddr> for Target {
    fn from(addr: SocketAddr) -> Target {
        Target {
            addr: addr.into(),
            labels: BTreeMap::new(),
        }
    }
}

impl From<TargetAddr> for Target {
    fn from(addr: TargetAddr) -> Target {
        Target {
            addr,
            labels: BTreeMap::new(),
        }
    }
}

/// A target's `host:port`: an IP address (`127.0.0.1:5432`, `[::1]:5432`) or a DNS name
/// (`localhost:5432`, `db.internal:5432`, a Kubernetes service name), resolved when a stream is
/// dialled, so a name that moves is followed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct TargetAddr {
    /// Host name or IP (without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl From<SocketAddr> for TargetAddr {
    fn from(a: SocketAddr) -> TargetAddr {
        TargetAddr {
            host: a.ip().to_string(),
            port: a.port(),
        }
    }
}

impl std::fmt::Display for TargetAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl std::str::FromStr for TargetAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<TargetAddr, String> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(a.into());
        }
        let bad = |why: &str| format!("'{s}' is not host:port ({why})");
        let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let port: u16 = port.parse().map_err(|_| bad("bad port"))?;
        let valid = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !valid {
            return Err(bad("not an IP address or a DNS name"));
        }
        Ok(TargetAddr {
            host: host.to_string(),
            port,
        })
    }
}

impl TryFrom<String> for TargetAddr {
    type Error = String;
    fn try_from(s: String) -> Result<TargetAddr, String> {
        s.parse()
    }
}

/// The two ways to write a target in TOML.
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "a \"host:port\" string or { addr = \"host:port\", labels = { key = \"value\" } }"
)]
enum TargetForm {
    /// `web = "127.0.0.1:8080"` or `db = "db.internal:5432"`.
    Addr(TargetAddr),
    /// `web = { addr = "127.0.0.1:8080", labels = { env = "prod" } }`.
    Full(TargetTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetTable {
    addr: TargetAddr,
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
    /// Seconds between attempts after a permanent failure (a refused or expired certificate,
    /// an untrusted proxy, a lock): retrying sooner would fail the same way. Default 300.
    pub permanent_secs: u64,
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        ReconnectConfig {
            base_ms: 100,
            cap_ms: 1500,
            permanent_secs: 300,
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
    /// A `POSTERN_AGENT_*` environment override held a bad value or named no field.
    #[error(transparent)]
    Env(#[from] postern_ops::overrides::EnvError),
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

/// The prefix of the environment overrides.
pub const ENV_PREFIX: &str = "POSTERN_AGENT_";

impl AgentConfig {
    /// Reads a TOML file (not yet validated).
    pub fn from_file(path: &Path) -> Result<AgentConfig, ConfigError> {
        Ok(Self::read(path)?.0)
    }

    /// The file at `path` with the `POSTERN_AGENT_*` environment overrides over it
    /// ([`postern_ops::overrides`]), not yet validated.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let (config, table) = Self::read(path)?;
        Ok(postern_ops::overrides::apply(&table, ENV_PREFIX)?.unwrap_or(config))
    }

    /// The file parsed as a config and as a TOML table.
    fn read(path: &Path) -> Result<(AgentConfig, toml::Table), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let parse = |e: toml::de::Error| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        };
        let config = toml::from_str(&text).map_err(parse)?;
        let table = toml::from_str(&text).map_err(parse)?;
        Ok((config, table))
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
        match (&self.join_token_file, &self.ca_pin) {
            (Some(_), None) => {
                return Err(invalid(
                    "ca_pin",
                    "joining with a token needs the cluster's CA pin (`pctl status` prints it)",
                ));
            }
            (Some(_), Some(_)) if self.proxy.is_none() => {
                return Err(invalid(
                    "proxy",
                    "joining with a token goes through the proxy's web address: set `proxy`",
                ));
            }
            _ => {}
        }
        if let Some(pin) = &self.ca_pin {
            crate::join::parse_pin(pin).map_err(|e| invalid("ca_pin", e))?;
        }
        if self.keepalive_interval_secs == 0 {
            return Err(invalid("keepalive_interval_secs", "must be at least 1"));
        }
        let t = &self.transport;
        if let Some(a) = &t.quic_addr
            && tunnel_proto::discovery::split_host_port(a).is_none()
        {
            return Err(invalid(
                "transport.quic_addr",
                format!("'{a}' is not host:port"),
            ));
        }
        if !(100..=60_000).contains(&t.quic_handshake_timeout_ms) {
            return Err(invalid(
                "transport.quic_handshake_timeout_ms",
                "must be 100..=60000",
            ));
        }
        if !(100..=60_000).contains(&t.quic_keepalive_ms) {
            return Err(invalid(
                "transport.quic_keepalive_ms",
                "must be 100..=60000",
            ));
        }
        if !tunnel_proto::quic::mtu_bound_ok(t.quic_mtu_upper_bound) {
            return Err(invalid(
                "transport.quic_mtu_upper_bound",
                "must be 1200..=6500 (above 6500, UDP GSO batches exceed 64 KiB and fail)",
            ));
        }
        if !(64 * 1024..=1 << 30).contains(&t.quic_stream_window_bytes) {
            return Err(invalid(
                "transport.quic_stream_window_bytes",
                "must be 65536..=1073741824",
            ));
        }
        if t.quic_max_streams == 0 {
            return Err(invalid("transport.quic_max_streams", "must be at least 1"));
        }
        if t.connection_window() < t.min_connection_window() {
            return Err(invalid(
                "transport.quic_connection_window_bytes",
                format!(
                    "must be at least quic_max_streams × quic_stream_window_bytes = {} (a smaller \
                     window lets stalled streams starve the rest of the tunnel)",
                    t.min_connection_window()
                ),
            ));
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

    /// Every target's address (what the tunnel dials).
    pub fn target_addrs(&self) -> BTreeMap<String, TargetAddr> {
        self.targets
            .iter()
            .map(|(n, t)| (n.clone(), t.addr.clone()))
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
