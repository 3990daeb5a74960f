//! The proxy's configuration: one TOML file, every field defaulted, validated in one place.
//!
//! This file holds the types and their defaults; `load` reads a file, applies the environment's
//! overrides and validates (`ProxyConfig::validate`, the one place).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// The whole proxy configuration (`proxy.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// This proxy's id, advertised by discovery. Default: read from (or written once to)
    /// `<data_dir>/proxy_id`.
    pub proxy_id: Option<String>,
    /// Where generated keys and certificates live. Default `/var/lib/postern-proxy`.
    pub data_dir: PathBuf,
    /// Listen addresses.
    pub listen: ListenConfig,
    /// Addresses the proxy is reached at from outside (behind a load balancer).
    pub public: PublicConfig,
    /// The web listener's TLS certificate.
    pub web_tls: WebTlsConfig,
    /// The tunnel listener's SSH settings.
    pub ssh: SshConfig,
    /// Connection limits.
    pub limits: LimitsConfig,
    /// The QUIC transport for agents (UDP).
    pub quic: QuicConfig,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
    /// PROXY protocol from trusted load balancers (web and tunnel listeners).
    pub proxy_protocol: crate::proxy_protocol::ProxyProtocolConfig,
    /// Heartbeats into each cluster's proxy set (see [`crate::peers`]).
    pub peers: crate::peers::PeersConfig,
    /// Clusters this proxy routes to, each with the CAs it trusts.
    pub clusters: Vec<ClusterConfig>,
    /// Start even as root (`--allow-root`). The proxy needs no privileges: give it
    /// `CAP_NET_BIND_SERVICE` for a port under 1024 instead.
    pub allow_root: bool,
}

/// Listen addresses of the three listeners.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// HTTPS discovery. Default `0.0.0.0:3080`.
    pub web: SocketAddr,
    /// SSH tunnel listener. Default `0.0.0.0:3024`.
    pub tunnel: SocketAddr,
    /// Plain-HTTP ops listener (`/metrics`, `/healthz`, `/readyz`). Default `127.0.0.1:3081`.
    pub ops: SocketAddr,
}

/// Public addresses advertised by discovery.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublicConfig {
    /// `host:port` of the web listener as clients reach it.
    pub web_addr: Option<String>,
    /// `host:port` of the tunnel listener as agents and clients reach it.
    pub tunnel_addr: Option<String>,
}

/// Web TLS certificate files; both absent means a self-signed certificate in the data dir.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebTlsConfig {
    /// PEM certificate chain.
    pub cert_file: Option<PathBuf>,
    /// PEM private key.
    pub key_file: Option<PathBuf>,
}

/// SSH settings of the tunnel listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SshConfig {
    /// OpenSSH private host key. Default `<data_dir>/ssh_host_ed25519_key` (generated if absent).
    pub host_key_file: Option<PathBuf>,
    /// OpenSSH host certificate for that key. Default `<host_key_file>-cert.pub`, used if present.
    pub host_cert_file: Option<PathBuf>,
    /// Seconds between keepalives when a peer is quiet. Default 15 (well under the 60 s idle
    /// timeout of common load balancers).
    pub keepalive_interval_secs: u64,
    /// Unanswered keepalives before the connection is dropped. Default 3.
    pub keepalive_max: usize,
    /// Seconds from TCP accept to a successful login before the connection is closed. Default 10.
    pub handshake_timeout_secs: u64,
}

/// Connection limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Connections that have not finished logging in, at most. Default 1024. When the pool is
    /// full a new connection is still admitted, and the oldest pre-login connection of the source
    /// holding the most is dropped.
    pub max_unauthenticated: usize,
    /// Pre-login connections one source address may hold, at most. Default 64.
    pub max_unauthenticated_per_source: usize,
    /// Streams one user may hold open to one target across its connections to this proxy, at
    /// most. Default 64 (a quarter of the Auth API's 256 TLS handshake slots).
    pub max_streams_per_user_per_target: usize,
    /// Streams open through one agent tunnel, at most. Default 10000.
    pub max_streams_per_tunnel: usize,
    /// Streams one client connection may hold open, at most. Default 1000.
    pub max_streams_per_client: usize,
    /// Agent tunnels one cluster may hold on this proxy, at most. Default 1000.
    pub max_tunnels_per_cluster: usize,
    /// New tunnel-listener connections accepted per source address per minute. Default 600.
    pub max_connects_per_source_per_minute: u32,
    /// Failed logins per (source address, login name) per minute before that login is refused
    /// from that address for the rest of the minute; and distinct login names failing from one
    /// address per minute before all its new connections are refused. One misconfigured agent
    /// retrying therefore never locks out its neighbours on the same address. Default 30.
    pub max_auth_failures_per_source_per_minute: u32,
    /// Seconds for a web client's TLS handshake, then for each request's headers. Default 10.
    pub web_header_timeout_secs: u64,
    /// Largest web request head (request line and headers), bytes. Default 65536.
    pub web_max_header_bytes: usize,
    /// Seconds a web request body (a login) has to arrive in full after its headers. Default 10.
    pub web_body_timeout_secs: u64,
    /// Seconds a web connection may go without the client sending a byte before it is closed
    /// (between requests, or a stalled body). Default 60.
    pub web_idle_timeout_secs: u64,
    /// Web connections open at once, at most; more are closed at accept. Keep it, with
    /// `max_unauthenticated` and the tunnels, under the process's descriptor limit. Default 512.
    pub web_max_connections: usize,
    /// Web connections open at once from one source address, at most. Default 32.
    pub web_max_connections_per_source: usize,
}

/// The QUIC transport: agents may dial it instead of SSH over TCP. One QUIC stream per client
/// stream, with QUIC's own per-stream flow control.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuicConfig {
    /// Serve QUIC (and advertise `["quic", "ssh"]` in discovery). Default true.
    pub enabled: bool,
    /// UDP address. Default: the tunnel listener's address (its UDP twin, port 3024).
    pub listen: Option<SocketAddr>,
    /// Bytes one stream may have in flight toward the proxy that the proxy has not passed on to
    /// its client: all a stalled client can make the proxy hold for its stream. Default 2 MiB
    /// (the SSH transport's credit window).
    pub stream_window_bytes: u64,
    /// Bytes in flight toward the proxy over all streams of one tunnel. Must be at least
    /// `limits.max_streams_per_tunnel × stream_window_bytes`, so that stalled streams, however
    /// many, cannot starve the others (quinn stops the whole connection at this window). Default:
    /// exactly that product.
    pub connection_window_bytes: Option<u64>,
    /// UDP socket send and receive buffer, bytes (the kernel clamps to `rmem_max`/`wmem_max`).
    /// Default 4 MiB: quinn leaves the OS default (about 208 KiB), which dropped about 1 % of
    /// datagrams under load.
    pub udp_buffer_bytes: usize,
    /// Upper bound of path MTU discovery, UDP payload bytes, 1200..=6500. Default 1452 (a
    /// 1,500-byte Ethernet path). Discovery probes up to it and settles on what the path carries,
    /// so raising it is safe; it pays on loopback and jumbo-frame networks (see the README).
    pub mtu_upper_bound: u16,
}

/// Graceful shutdown.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Seconds open streams get to finish after SIGTERM. Default 30.
    pub grace_secs: u64,
    /// Seconds between SIGTERM and the drain during which `/readyz` answers 503 while the
    /// listeners still accept, so a balancer checking `/readyz` stops sending new connections
    /// before they are refused (0..=300). Default 0 (Kubernetes' `preStop` wait does the same).
    pub unready_secs: u64,
}

/// One cluster the proxy routes to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Cluster name (`example`); streams name targets as `<target>.<name>`.
    pub name: String,
    /// OpenSSH public-key lines of the host CA that signs agent certificates (several while
    /// rotating).
    pub host_ca: Vec<String>,
    /// OpenSSH public-key lines of the user CA that signs client certificates.
    pub user_ca: Vec<String>,
    /// Where the roles and locks that decide this cluster's streams come from.
    #[serde(default)]
    pub policy: PolicyConfig,
}

/// Where a cluster's policy comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicySource {
    /// No policy source: only the Auth target `auth` is reachable (the default).
    #[default]
    Deny,
    /// Roles, users and locks watched from the cluster's Auth server, through the cluster's own
    /// tunnel, with `identity_file` (a user with the preset role `proxy`).
    Auth,
    /// No authorization beyond the certificate: every user of the cluster reaches every target.
    /// Only for a tunnel-only setup without an Auth server (certificates from `certs issue`).
    Open,
}

/// A cluster's policy settings (`[clusters.policy]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// `deny` (default), `auth` or `open`.
    pub source: PolicySource,
    /// With `auth`: the proxy's identity file (`pctl auth sign --user=<proxy user>`), re-read at
    /// every connection to the Auth server. The proxy renews it in place at two-thirds of its
    /// life (so the directory must be writable by the proxy).
    pub identity_file: Option<PathBuf>,
    /// With `auth`: how long the last known policy is used while the Auth server is unreachable;
    /// after that new streams are refused. Default 60.
    pub stale_after_secs: u64,
    /// With `auth`: how often the proxy reads the cluster's trusted CA keys from the Auth server
    /// (a CA rotation reaches the proxy within this). Default 10.
    pub ca_refresh_secs: u64,
    /// With `auth`: when the host CA's signing key changes (a rotation's `update_clients`, or a
    /// rollback), the agents of this proxy renew their certificates at random moments within
    /// this many seconds (0: at once). Default 60.
    pub renew_spread_secs: u32,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            source: PolicySource::Deny,
            identity_file: None,
            stale_after_secs: 60,
            ca_refresh_secs: 10,
            renew_spread_secs: 60,
        }
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            proxy_id: None,
            data_dir: PathBuf::from("/var/lib/postern-proxy"),
            listen: ListenConfig::default(),
            public: PublicConfig::default(),
            web_tls: WebTlsConfig::default(),
            ssh: SshConfig::default(),
            limits: LimitsConfig::default(),
            quic: QuicConfig::default(),
            shutdown: ShutdownConfig::default(),
            proxy_protocol: Default::default(),
            peers: Default::default(),
            clusters: Vec::new(),
            allow_root: false,
        }
    }
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            web: ([0, 0, 0, 0], tunnel_proto::names::DEFAULT_WEB_PORT).into(),
            tunnel: ([0, 0, 0, 0], tunnel_proto::names::DEFAULT_TUNNEL_PORT).into(),
            ops: ([127, 0, 0, 1], 3081).into(),
        }
    }
}

impl Default for SshConfig {
    fn default() -> Self {
        SshConfig {
            host_key_file: None,
            host_cert_file: None,
            keepalive_interval_secs: 15,
            keepalive_max: 3,
            handshake_timeout_secs: 10,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_unauthenticated: 1024,
            max_unauthenticated_per_source: 64,
            max_streams_per_user_per_target: 64,
            max_streams_per_tunnel: 10_000,
            max_streams_per_client: 1000,
            max_tunnels_per_cluster: 1000,
            max_connects_per_source_per_minute: 600,
            max_auth_failures_per_source_per_minute: 30,
            web_header_timeout_secs: 10,
            web_max_header_bytes: 64 * 1024,
            web_body_timeout_secs: 10,
            web_idle_timeout_secs: 60,
            web_max_connections: 512,
            web_max_connections_per_source: 32,
        }
    }
}

impl Default for QuicConfig {
    fn default() -> Self {
        QuicConfig {
            enabled: true,
            listen: None,
            stream_window_bytes: 2 << 20,
            connection_window_bytes: None,
            udp_buffer_bytes: 4 << 20,
            mtu_upper_bound: tunnel_proto::quic::MTU_UPPER_BOUND_DEFAULT,
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace_secs: 30,
            unready_secs: 0,
        }
    }
}

/// A configuration problem, naming the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TOML did not parse or named an unknown field.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What toml said, with line and column.
        message: String,
    },
    /// A `POSTERN_PROXY_*` environment override held a bad value or named no field.
    #[error(transparent)]
    Env(#[from] postern_ops::overrides::EnvError),
    /// A field has a bad value.
    #[error("config field `{field}`: {message}")]
    Invalid {
        /// Dotted field name.
        field: String,
        /// What is wrong and what is expected.
        message: String,
    },
}

/// The prefix of the proxy's environment overrides.
pub const ENV_PREFIX: &str = "POSTERN_PROXY_";

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

mod load;

#[cfg(test)]
mod tests;
