//! The flow-control and QUIC settings in effect for the run: read back from the configuration
//! files the proxy and the agent were started with (through their own config types), quinn's
//! defaults that neither side changes, and what this kernel offers for UDP segmentation offload.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::support::bytes;

/// The knobs, as printed under the table.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Knobs {
    /// SSH transport: bytes of one stream the agent may have outstanding at the proxy
    /// (`tunnel_proto::credit::STREAM_WINDOW`).
    pub ssh_stream_window: u64,
    /// QUIC, proxy side: `quic.stream_window_bytes` (its `stream_receive_window`).
    pub proxy_stream_window: u64,
    /// QUIC, proxy side: the connection `receive_window`.
    pub proxy_connection_window: u64,
    /// QUIC, proxy side: `quic.udp_buffer_bytes` (asked of the kernel).
    pub proxy_udp_buffer: u64,
    /// QUIC, agent side: `transport.quic_stream_window_bytes`.
    pub agent_stream_window: u64,
    /// QUIC, agent side: the connection `receive_window`.
    pub agent_connection_window: u64,
    /// QUIC, agent side: `transport.quic_max_streams`.
    pub agent_max_streams: u32,
    /// QUIC path MTU discovery upper bound, proxy side (`quic.mtu_upper_bound`).
    #[serde(default)]
    pub proxy_mtu_bound: u16,
    /// The same, agent side (`transport.quic_mtu_upper_bound`).
    #[serde(default)]
    pub agent_mtu_bound: u16,
    /// `net.core.rmem_max` (the kernel clamps UDP receive buffers to it).
    pub rmem_max: Option<u64>,
    /// `net.core.wmem_max`.
    pub wmem_max: Option<u64>,
    /// Segments per UDP send quinn would use here (1: no GSO), from quinn-udp's own probe.
    pub gso_segments: Option<usize>,
    /// Segments per UDP receive (1: no GRO).
    pub gro_segments: Option<usize>,
}

fn sysctl(name: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Reads the knobs from the configuration files of a QUIC setup.
pub fn read(proxy_config: &Path, agent_config: &Path) -> anyhow::Result<Knobs> {
    let proxy = postern_proxy::ProxyConfig::from_toml(&std::fs::read_to_string(proxy_config)?)
        .map_err(anyhow::Error::msg)
        .context("the run's proxy.toml")?;
    let agent = postern_agent::AgentConfig::from_file(agent_config)?;
    let t = &agent.transport;
    let probe = std::net::UdpSocket::bind("127.0.0.1:0")
        .ok()
        .and_then(|s| quinn_udp::UdpSocketState::new((&s).into()).ok());
    Ok(Knobs {
        ssh_stream_window: u64::from(tunnel_proto::credit::STREAM_WINDOW),
        proxy_stream_window: proxy.quic.stream_window_bytes,
        proxy_connection_window: proxy.quic_connection_window(),
        proxy_udp_buffer: proxy.quic.udp_buffer_bytes as u64,
        agent_stream_window: t.quic_stream_window_bytes,
        agent_connection_window: t.connection_window(),
        agent_max_streams: t.quic_max_streams,
        proxy_mtu_bound: proxy.quic.mtu_upper_bound,
        agent_mtu_bound: t.quic_mtu_upper_bound,
        rmem_max: sysctl("rmem_max"),
        wmem_max: sysctl("wmem_max"),
        gso_segments: probe.as_ref().map(|p| p.max_gso_segments()),
        gro_segments: probe.as_ref().map(|p| p.gro_segments()),
    })
}

impl Knobs {
    /// A Markdown table of the knobs.
    pub fn render(&self) -> String {
        let opt = |v: Option<u64>| v.map(bytes).unwrap_or_else(|| "unknown".into());
        let segs = |v: Option<usize>, what: &str| match v {
            Some(n) if n > 1 => {
                format!("on here: up to {n} datagrams per {what} (quinn-udp probe)")
            }
            Some(_) => "off here (the kernel does not offer it)".into(),
            None => "unknown (the probe failed)".into(),
        };
        let mut s = String::from(
            "\nFlow control and QUIC settings in effect:\n\n| knob | proxy (receives from the agent) | agent (receives from the proxy) |\n|---|---|---|\n",
        );
        s.push_str(&format!(
            "| SSH transport: per-stream credit window (`tunnel_proto::credit::STREAM_WINDOW`) | {} | {} |\n",
            bytes(self.ssh_stream_window),
            bytes(self.ssh_stream_window)
        ));
        s.push_str(&format!(
            "| QUIC `stream_receive_window` | {} (`quic.stream_window_bytes`) | {} (`transport.quic_stream_window_bytes`) |\n",
            bytes(self.proxy_stream_window),
            bytes(self.agent_stream_window)
        ));
        s.push_str(&format!(
            "| QUIC connection `receive_window` | {} (max_streams_per_tunnel × stream window) | {} (quic_max_streams {} × stream window) |\n",
            bytes(self.proxy_connection_window),
            bytes(self.agent_connection_window),
            self.agent_max_streams
        ));
        s.push_str(&format!(
            "| UDP socket buffers asked | {} (`quic.udp_buffer_bytes`) | 4.0 MiB (fixed in the agent) |\n",
            bytes(self.proxy_udp_buffer)
        ));
        s.push_str(&format!(
            "| kernel caps (`net.core.rmem_max` / `wmem_max`) | {} / {} | same |\n",
            opt(self.rmem_max),
            opt(self.wmem_max)
        ));
        s.push_str(&format!(
            "| QUIC path MTU discovery upper bound (UDP payload bytes) | {} (`quic.mtu_upper_bound`) | {} (`transport.quic_mtu_upper_bound`); the \"MTU ≤\" row raises both |\n",
            self.proxy_mtu_bound, self.agent_mtu_bound
        ));
        s.push_str("| congestion controller | Cubic (quinn's default; not set) | Cubic (quinn's default; not set) |\n");
        s.push_str(&format!(
            "| UDP GSO (quinn's `enable_segmentation_offload`, default on) | {} | same |\n",
            segs(self.gso_segments, "send")
        ));
        s.push_str(&format!(
            "| UDP GRO | {} | same |\n",
            segs(self.gro_segments, "receive")
        ));
        s
    }
}
