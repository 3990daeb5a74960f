//! Discovery: the JSON of `GET /webapi/ping` and `GET /webapi/find`, and where to dial the tunnel.

use serde::{Deserialize, Serialize};

use crate::names::DEFAULT_TUNNEL_PORT;

/// Path of the ping endpoint (cluster names, versions, proxy settings).
pub const PING_PATH: &str = "/webapi/ping";
/// Path of the find endpoint (proxy settings only; cheap, unauthenticated).
pub const FIND_PATH: &str = "/webapi/find";
/// Environment variable that overrides the discovered tunnel address (first in the order).
pub const TUNNEL_ADDR_ENV: &str = "POSTERN_TUNNEL_ADDR";
/// Transport name of SSH over TCP.
pub const TRANSPORT_SSH: &str = "ssh";
/// The QUIC transport's name in [`ProxySettings::transports`] (UDP, see [`crate::quic`]).
pub const TRANSPORT_QUIC: &str = "quic";

/// Answer of `GET /webapi/ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingResponse {
    /// Clusters this proxy routes to (those it holds trust for).
    pub cluster_names: Vec<String>,
    /// Version of the proxy (`CARGO_PKG_VERSION`).
    pub server_version: String,
    /// Oldest client version this proxy accepts.
    pub min_client_version: String,
    /// Tunnel protocol version ([`crate::PROTOCOL_VERSION`]).
    pub protocol_version: u32,
    /// How to reach this proxy's tunnel listener.
    pub proxy: ProxySettings,
}

/// Answer of `GET /webapi/find`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FindResponse {
    /// Version of the proxy.
    pub server_version: String,
    /// How to reach this proxy's tunnel listener.
    pub proxy: ProxySettings,
}

/// How a proxy is reached, as it advertises itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxySettings {
    /// Public address of the web listener (`host:port`), if configured.
    pub web_public_addr: Option<String>,
    /// Public address of the tunnel listener (what sits behind a load balancer), if configured.
    pub tunnel_public_addr: Option<String>,
    /// Address the tunnel listener is bound to (`0.0.0.0:3024` by default).
    pub tunnel_listen_addr: String,
    /// Whether TLS routing (tunnel over the web port) is on. Always `false` for now.
    pub tls_routing_enabled: bool,
    /// Transports offered, best first (`["quic", "ssh"]` with QUIC on, else `["ssh"]`).
    pub transports: Vec<String>,
    /// UDP port of the QUIC listener, when QUIC is offered (by default the tunnel port: its UDP
    /// twin). Absent from older proxies' answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quic_port: Option<u16>,
    /// This proxy's id.
    pub proxy_id: String,
    /// Ids of every proxy behind the same public address, this one included (an agent keeps
    /// dialling until it holds a tunnel to each).
    pub proxy_ids: Vec<String>,
}

impl ProxySettings {
    /// The tunnel address to dial, in the documented order:
    /// 1. `env_override` (the [`TUNNEL_ADDR_ENV`] variable), when set and not empty;
    /// 2. the tunnel public address;
    /// 3. the tunnel listen address, with an unspecified host (`0.0.0.0`, `::`) replaced by the
    ///    host of the web address the caller dialled;
    /// 4. the web host with [`DEFAULT_TUNNEL_PORT`].
    pub fn tunnel_addr(&self, env_override: Option<&str>, web_host: &str) -> String {
        self.tunnel_addr_inner(env_override, web_host)
    }

    /// Where to dial QUIC, if the proxy offers it: the host of `tunnel_addr` (as resolved by
    /// [`ProxySettings::tunnel_addr`]) with [`ProxySettings::quic_port`], or the tunnel port itself
    /// (its UDP twin) when no port is given.
    pub fn quic_addr(&self, tunnel_addr: &str) -> Option<String> {
        if !self.transports.iter().any(|t| t == TRANSPORT_QUIC) {
            return None;
        }
        let (host, port) = split_host_port(tunnel_addr)?;
        Some(match self.quic_port {
            Some(p) => join_host_port(host, &p.to_string()),
            None => join_host_port(host, port),
        })
    }

    fn tunnel_addr_inner(&self, env_override: Option<&str>, web_host: &str) -> String {
        if let Some(addr) = env_override.map(str::trim).filter(|a| !a.is_empty()) {
            return addr.to_owned();
        }
        if let Some(addr) = self.tunnel_public_addr.as_deref().filter(|a| !a.is_empty()) {
            return addr.to_owned();
        }
        if let Some((host, port)) = split_host_port(&self.tunnel_listen_addr) {
            let unspecified = matches!(host, "" | "0.0.0.0" | "::" | "[::]");
            let host = if unspecified { web_host } else { host };
            return join_host_port(host, port);
        }
        join_host_port(web_host, &DEFAULT_TUNNEL_PORT.to_string())
    }
}

/// Splits `host:port` (or `[v6]:port`) into its parts; `None` when there is no port.
pub fn split_host_port(addr: &str) -> Option<(&str, &str)> {
    let (host, port) = addr.rsplit_once(':')?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return None;
    }
    Some((host, port))
}

/// Joins a host and a port, bracketing bare IPv6 hosts.
pub fn join_host_port(host: &str, port: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A JSON error body, as every non-2xx web answer carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(public: Option<&str>, listen: &str) -> ProxySettings {
        ProxySettings {
            web_public_addr: None,
            tunnel_public_addr: public.map(str::to_owned),
            tunnel_listen_addr: listen.to_owned(),
            tls_routing_enabled: false,
            transports: vec![TRANSPORT_SSH.into()],
            quic_port: None,
            proxy_id: "p1".into(),
            proxy_ids: vec!["p1".into()],
        }
    }

    #[test]
    fn resolution_order() {
        let s = settings(Some("lb.example:443"), "0.0.0.0:3024");
        assert_eq!(s.tunnel_addr(Some("x:1"), "web"), "x:1");
        assert_eq!(s.tunnel_addr(Some(" "), "web"), "lb.example:443");
        assert_eq!(s.tunnel_addr(None, "web"), "lb.example:443");
        let s = settings(None, "0.0.0.0:4024");
        assert_eq!(s.tunnel_addr(None, "proxy.example"), "proxy.example:4024");
        let s = settings(None, "[::]:4024");
        assert_eq!(s.tunnel_addr(None, "::1"), "[::1]:4024");
        let s = settings(None, "10.1.2.3:3024");
        assert_eq!(s.tunnel_addr(None, "web"), "10.1.2.3:3024");
        let s = settings(None, "garbage");
        assert_eq!(s.tunnel_addr(None, "web"), "web:3024");
    }

    #[test]
    fn json_round_trip_and_strictness() {
        let ping = PingResponse {
            cluster_names: vec!["example".into()],
            server_version: "0.1.0".into(),
            min_client_version: "0.1.0".into(),
            protocol_version: 1,
            proxy: settings(None, "0.0.0.0:3024"),
        };
        let json = serde_json::to_string(&ping).unwrap();
        assert_eq!(serde_json::from_str::<PingResponse>(&json).unwrap(), ping);
        assert!(serde_json::from_str::<PingResponse>("{\"cluster_names\":[]}").is_err());
        // Newer proxies may add fields: old clients must still parse the answer.
        let mut v = serde_json::to_value(&ping).unwrap();
        v["future_field"] = serde_json::json!(1);
        assert_eq!(serde_json::from_value::<PingResponse>(v).unwrap(), ping);
    }
}
