//! The PROXY protocol (v1 and v2) from trusted load balancers.
//!
//! Behind an L4 balancer every connection carries the balancer's address, which would make the
//! per-source limits, the audit's source address and the logs meaningless. A balancer in one of
//! `proxy_protocol.trusted_networks` sends a PROXY header first (HAProxy's `send-proxy` or
//! `send-proxy-v2`); the proxy reads it and uses the client address it names from then on:
//! - from a trusted network, a header is read (v1 or v2); with `require` (the default), a
//!   connection without one is refused; a `LOCAL` header (a balancer's health check) keeps the
//!   balancer's own address;
//! - from anywhere else, a connection that starts with a PROXY header is refused: nobody else may
//!   claim another address;
//! - a malformed or truncated header, or one that does not arrive within the deadline, is refused.
//!
//! Parsing is the `proxy-header` crate's; this module decides whom to believe.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use proxy_header::{ParseConfig, ProxyHeader};
use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The v2 signature; a v1 header starts with `PROXY `.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header (RFC: 107 bytes), and a bound on v2 headers (their TLVs included).
const MAX_HEADER: usize = 1024;

/// `[proxy_protocol]` in `proxy.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyProtocolConfig {
    /// Networks of the load balancers that send PROXY headers (`10.0.0.0/8`, `192.0.2.7/32`).
    /// Empty (the default) turns the PROXY protocol off: every connection's own address counts.
    pub trusted_networks: Vec<String>,
    /// Refuse a connection from a trusted network that sends no header. Default true.
    #[serde(default = "yes")]
    pub require: bool,
}

fn yes() -> bool {
    true
}

impl Default for ProxyProtocolConfig {
    fn default() -> Self {
        ProxyProtocolConfig {
            trusted_networks: Vec::new(),
            require: true,
        }
    }
}

/// The parsed policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    trusted: Vec<IpNet>,
    require: bool,
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A PROXY header from an address that is not a trusted balancer.
    #[error("PROXY header from {0}, which is not in proxy_protocol.trusted_networks")]
    Untrusted(IpAddr),
    /// A trusted balancer's connection without a header, while one is required.
    #[error("no PROXY header from trusted balancer {0} (proxy_protocol.require is on)")]
    Missing(IpAddr),
    /// The header could not be parsed.
    #[error("malformed PROXY header from {0}: {1}")]
    Malformed(IpAddr, String),
    /// The header did not arrive in time, or the connection ended first.
    #[error("no complete PROXY header from {0} in time")]
    Incomplete(IpAddr),
}

impl Refusal {
    /// The metric label of this refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Untrusted(_) => "proxy_header_untrusted",
            Refusal::Missing(_) => "proxy_header_missing",
            Refusal::Malformed(..) => "proxy_header_malformed",
            Refusal::Incomplete(_) => "proxy_header_incomplete",
        }
    }
}

impl ProxyProtocolConfig {
    /// Parses the networks; the error names the bad entry.
    pub fn policy(&self) -> Result<Policy, String> {
        let trusted = self
            .trusted_networks
            .iter()
            .map(|n| {
                n.parse::<IpNet>()
                    .or_else(|_| n.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("'{n}' is not a network (10.0.0.0/8) or an address"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Policy {
            trusted,
            require: self.require,
        })
    }
}

impl Policy {
    /// Whether the PROXY protocol is on at all.
    pub fn enabled(&self) -> bool {
        !self.trusted.is_empty()
    }

    /// Whether `ip` is a trusted balancer.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.trusted.iter().any(|n| n.contains(&ip))
    }

    /// The address a connection from `peer` speaks for: reads (and consumes) its PROXY header
    /// when one is expected or present, within `deadline`. With the protocol off, `peer`.
    pub async fn source(
        &self,
        stream: &mut TcpStream,
        peer: SocketAddr,
        deadline: Duration,
    ) -> Result<SocketAddr, Refusal> {
        if !self.enabled() {
            return Ok(peer);
        }
        match tokio::time::timeout(deadline, self.read(stream, peer)).await {
            Ok(r) => r,
            Err(_) => Err(Refusal::Incomplete(peer.ip())),
        }
    }

    async fn read(&self, stream: &mut TcpStream, peer: SocketAddr) -> Result<SocketAddr, Refusal> {
        let trusted = self.trusts(peer.ip());
        let starts_with_header = starts_with_header(stream, peer).await?;
        match (starts_with_header, trusted) {
            (false, false) => return Ok(peer),
            (false, true) if !self.require => return Ok(peer),
            (false, true) => return Err(Refusal::Missing(peer.ip())),
            (true, false) => return Err(Refusal::Untrusted(peer.ip())),
            (true, true) => {}
        }
        let header = read_header(stream, peer).await?;
        let (parsed, _) = ProxyHeader::parse(&header, ParseConfig::default())
            .map_err(|e| Refusal::Malformed(peer.ip(), format!("{e:?}")))?;
        Ok(parsed.proxied_address().map_or(peer, |a| a.source))
    }
}

/// IPv4-mapped IPv6 addresses compare as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Peeks until the first bytes show whether a PROXY header starts the connection.
async fn starts_with_header(stream: &TcpStream, peer: SocketAddr) -> Result<bool, Refusal> {
    let mut buf = [0u8; 12];
    loop {
        let n = stream
            .peek(&mut buf)
            .await
            .map_err(|_| Refusal::Incomplete(peer.ip()))?;
        if n == 0 {
            return Err(Refusal::Incomplete(peer.ip()));
        }
        let seen = &buf[..n];
        let v1 = b"PROXY ".starts_with(&seen[..n.min(6)]);
        let v2 = V2_SIGNATURE.starts_with(seen);
        if !v1 && !v2 {
            return Ok(false);
        }
        if (v1 && n >= 6) || n >= 12 {
            return Ok(true);
        }
        // A prefix of a header so far: wait for the rest (the caller's deadline bounds this).
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads exactly the header's bytes off the stream (nothing of what follows it).
async fn read_header(stream: &mut TcpStream, peer: SocketAddr) -> Result<Vec<u8>, Refusal> {
    let incomplete = |_| Refusal::Incomplete(peer.ip());
    let mut first = [0u8; 16];
    stream
        .read_exact(&mut first[..6])
        .await
        .map_err(incomplete)?;
    if &first[..6] == b"PROXY " {
        // v1: up to CRLF, byte by byte (at most 107 bytes).
        let mut line = first[..6].to_vec();
        while !line.ends_with(b"\r\n") {
            if line.len() >= 107 {
                return Err(Refusal::Malformed(
                    peer.ip(),
                    "v1 header longer than 107 bytes".into(),
                ));
            }
            let mut b = [0u8; 1];
            stream.read_exact(&mut b).await.map_err(incomplete)?;
            line.push(b[0]);
        }
        return Ok(line);
    }
    stream
        .read_exact(&mut first[6..16])
        .await
        .map_err(incomplete)?;
    if &first[..12] != V2_SIGNATURE {
        return Err(Refusal::Malformed(peer.ip(), "bad v2 signature".into()));
    }
    let len = u16::from_be_bytes([first[14], first[15]]) as usize;
    if 16 + len > MAX_HEADER {
        return Err(Refusal::Malformed(
            peer.ip(),
            format!("v2 header of {} bytes", 16 + len),
        ));
    }
    let mut header = first.to_vec();
    header.resize(16 + len, 0);
    stream
        .read_exact(&mut header[16..])
        .await
        .map_err(incomplete)?;
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_parse_and_match() {
        let p = ProxyProtocolConfig {
            trusted_networks: vec!["10.0.0.0/8".into(), "192.0.2.7".into()],
            require: true,
        }
        .policy()
        .unwrap();
        assert!(p.trusts("10.1.2.3".parse().unwrap()));
        assert!(p.trusts("192.0.2.7".parse().unwrap()));
        assert!(p.trusts("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!p.trusts("192.0.2.8".parse().unwrap()));
        let e = ProxyProtocolConfig {
            trusted_networks: vec!["10.0.0.0/33".into()],
            require: true,
        }
        .policy()
        .unwrap_err();
        assert!(e.contains("10.0.0.0/33"), "{e}");
    }
}
