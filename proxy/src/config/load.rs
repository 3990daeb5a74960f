//! Reading `proxy.toml`, the environment's overrides, and validation: every check of every field
//! in [`ProxyConfig::validate`], with an error naming the field.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tunnel_proto::names::validate_cluster;

use super::*;

impl ProxyConfig {
    /// Reads and parses a TOML file (not yet validated).
    pub fn from_file(path: &Path) -> Result<ProxyConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// The file at `path` (defaults without one) with the `POSTERN_PROXY_*` environment
    /// overrides over it ([`postern_ops::overrides`]; `POSTERN_PROXY_LISTEN__WEB`, …), not yet
    /// validated.
    pub fn load(path: Option<&Path>) -> Result<ProxyConfig, ConfigError> {
        let Some(path) = path else {
            let empty = toml::Table::new();
            return Ok(postern_ops::overrides::apply(&empty, ENV_PREFIX)?.unwrap_or_default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let parse = |message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        };
        let config = Self::from_toml(&text).map_err(parse)?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| parse(e.to_string()))?;
        Ok(postern_ops::overrides::apply(&table, ENV_PREFIX)?.unwrap_or(config))
    }

    /// Parses TOML text (not yet validated).
    pub fn from_toml(text: &str) -> Result<ProxyConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(id) = &self.proxy_id {
            tunnel_proto::names::validate_label("proxy id", id)
                .map_err(|e| invalid("proxy_id", e.to_string()))?;
        }
        if self.shutdown.unready_secs > 300 {
            return Err(invalid("shutdown.unready_secs", "must be 0..=300"));
        }
        if let Err((field, message)) = self.peers.validate() {
            return Err(invalid(&field, message));
        }
        if self.ssh.keepalive_interval_secs == 0 || self.ssh.keepalive_interval_secs > 3600 {
            return Err(invalid("ssh.keepalive_interval_secs", "must be 1..=3600"));
        }
        if self.ssh.keepalive_max == 0 {
            return Err(invalid("ssh.keepalive_max", "must be at least 1"));
        }
        if self.ssh.handshake_timeout_secs == 0 || self.ssh.handshake_timeout_secs > 300 {
            return Err(invalid("ssh.handshake_timeout_secs", "must be 1..=300"));
        }
        for (field, v) in [
            (
                "limits.max_streams_per_client",
                self.limits.max_streams_per_client,
            ),
            (
                "limits.max_tunnels_per_cluster",
                self.limits.max_tunnels_per_cluster,
            ),
            (
                "limits.max_unauthenticated_per_source",
                self.limits.max_unauthenticated_per_source,
            ),
            (
                "limits.max_streams_per_user_per_target",
                self.limits.max_streams_per_user_per_target,
            ),
            (
                "limits.max_connects_per_source_per_minute",
                self.limits.max_connects_per_source_per_minute as usize,
            ),
            (
                "limits.max_auth_failures_per_source_per_minute",
                self.limits.max_auth_failures_per_source_per_minute as usize,
            ),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        if !(1..=300).contains(&self.limits.web_header_timeout_secs) {
            return Err(invalid("limits.web_header_timeout_secs", "must be 1..=300"));
        }
        if !(8192..=1 << 20).contains(&self.limits.web_max_header_bytes) {
            return Err(invalid(
                "limits.web_max_header_bytes",
                "must be 8192..=1048576",
            ));
        }
        if let Err(e) = self.proxy_protocol.policy() {
            return Err(invalid("proxy_protocol.trusted_networks", e));
        }
        for (field, v) in [
            (
                "limits.web_body_timeout_secs",
                self.limits.web_body_timeout_secs,
            ),
            (
                "limits.web_idle_timeout_secs",
                self.limits.web_idle_timeout_secs,
            ),
        ] {
            if !(1..=3600).contains(&v) {
                return Err(invalid(field, "must be 1..=3600"));
            }
        }
        if self.limits.web_max_connections == 0 {
            return Err(invalid("limits.web_max_connections", "must be at least 1"));
        }
        if !(1..=self.limits.web_max_connections)
            .contains(&self.limits.web_max_connections_per_source)
        {
            return Err(invalid(
                "limits.web_max_connections_per_source",
                "must be 1..=limits.web_max_connections",
            ));
        }
        if self.limits.max_unauthenticated == 0 {
            return Err(invalid("limits.max_unauthenticated", "must be at least 1"));
        }
        if self.limits.max_streams_per_tunnel == 0 {
            return Err(invalid(
                "limits.max_streams_per_tunnel",
                "must be at least 1",
            ));
        }
        if !(64 * 1024..=1 << 30).contains(&self.quic.stream_window_bytes) {
            return Err(invalid(
                "quic.stream_window_bytes",
                "must be 65536..=1073741824",
            ));
        }
        let needed = self.quic_connection_window();
        if needed < self.min_quic_connection_window() {
            return Err(invalid(
                "quic.connection_window_bytes",
                format!(
                    "must be at least limits.max_streams_per_tunnel × quic.stream_window_bytes = {} \
                     (a smaller window lets stalled streams starve the rest of their tunnel)",
                    self.min_quic_connection_window()
                ),
            ));
        }
        if !tunnel_proto::quic::mtu_bound_ok(self.quic.mtu_upper_bound) {
            return Err(invalid(
                "quic.mtu_upper_bound",
                "must be 1200..=6500 (above 6500, UDP GSO batches exceed 64 KiB and fail)",
            ));
        }
        if !(64 * 1024..=256 << 20).contains(&self.quic.udp_buffer_bytes) {
            return Err(invalid(
                "quic.udp_buffer_bytes",
                "must be 65536..=268435456",
            ));
        }
        if self.web_tls.cert_file.is_some() != self.web_tls.key_file.is_some() {
            return Err(invalid(
                "web_tls",
                "set both cert_file and key_file, or neither (self-signed)",
            ));
        }
        for (field, addr) in [
            ("public.web_addr", &self.public.web_addr),
            ("public.tunnel_addr", &self.public.tunnel_addr),
        ] {
            if let Some(a) = addr
                && tunnel_proto::discovery::split_host_port(a).is_none()
            {
                return Err(invalid(field, format!("'{a}' is not host:port")));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, c) in self.clusters.iter().enumerate() {
            validate_cluster(&c.name)
                .map_err(|e| invalid(format!("clusters[{i}].name"), e.to_string()))?;
            if !seen.insert(&c.name) {
                return Err(invalid(
                    format!("clusters[{i}].name"),
                    format!("cluster '{}' listed twice", c.name),
                ));
            }
            if c.policy.source == PolicySource::Auth && c.policy.identity_file.is_none() {
                return Err(invalid(
                    format!("clusters[{i}].policy.identity_file"),
                    "source = \"auth\" needs the proxy's identity file (pctl users add <proxy> --roles=proxy; pctl auth sign --user=<proxy> --out=FILE)",
                ));
            }
            if !(1..=3_600).contains(&c.policy.ca_refresh_secs) {
                return Err(invalid(
                    format!("clusters[{i}].policy.ca_refresh_secs"),
                    "must be 1..=3600",
                ));
            }
            if c.policy.renew_spread_secs > 86_400 {
                return Err(invalid(
                    format!("clusters[{i}].policy.renew_spread_secs"),
                    "must be 0..=86400",
                ));
            }
            if !(1..=86_400).contains(&c.policy.stale_after_secs) {
                return Err(invalid(
                    format!("clusters[{i}].policy.stale_after_secs"),
                    "must be 1..=86400",
                ));
            }
            for (field, lines) in [("host_ca", &c.host_ca), ("user_ca", &c.user_ca)] {
                if lines.is_empty() {
                    return Err(invalid(
                        format!("clusters[{i}].{field}"),
                        "list at least one OpenSSH public-key line",
                    ));
                }
                postern_ssh_lines(lines)
                    .map_err(|e| invalid(format!("clusters[{i}].{field}"), e))?;
            }
        }
        Ok(())
    }

    /// Keepalive interval.
    pub fn keepalive(&self) -> Duration {
        Duration::from_secs(self.ssh.keepalive_interval_secs)
    }

    /// The QUIC listener's UDP address: `quic.listen`, or the tunnel address (its UDP twin).
    pub fn quic_listen(&self) -> SocketAddr {
        self.quic.listen.unwrap_or(self.listen.tunnel)
    }

    /// The smallest QUIC connection window that keeps stalled streams from starving the others.
    pub fn min_quic_connection_window(&self) -> u64 {
        (self.limits.max_streams_per_tunnel as u64).saturating_mul(self.quic.stream_window_bytes)
    }

    /// The QUIC connection receive window in use.
    pub fn quic_connection_window(&self) -> u64 {
        self.quic
            .connection_window_bytes
            .unwrap_or_else(|| self.min_quic_connection_window())
    }

    /// Handshake timeout.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.ssh.handshake_timeout_secs)
    }

    /// Shutdown grace period.
    pub fn grace(&self) -> Duration {
        Duration::from_secs(self.shutdown.grace_secs)
    }

    /// Path of the SSH host key.
    pub fn host_key_path(&self) -> PathBuf {
        self.ssh
            .host_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("ssh_host_ed25519_key"))
    }

    /// Path of the SSH host certificate.
    pub fn host_cert_path(&self) -> PathBuf {
        self.ssh.host_cert_file.clone().unwrap_or_else(|| {
            let mut p = self.host_key_path().into_os_string();
            p.push("-cert.pub");
            PathBuf::from(p)
        })
    }
}

fn postern_ssh_lines(lines: &[String]) -> Result<(), String> {
    for line in lines {
        let key = russh::keys::ssh_key::PublicKey::from_openssh(line.trim()).map_err(|e| {
            format!(
                "not an OpenSSH public key line ({e}): '{}'",
                line.chars().take(40).collect::<String>()
            )
        })?;
        if key.algorithm().is_rsa() {
            return Err(format!(
                "'{}': {}",
                line.chars().take(40).collect::<String>(),
                postern_dial::ssh::RSA_NOT_SUPPORTED
            ));
        }
    }
    Ok(())
}
