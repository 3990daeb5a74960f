//! The QUIC tunnel listener: agents dial UDP (by default the tunnel port's UDP twin), prove their
//! SSH host certificate by signing a TLS exporter value of the connection, register targets and
//! speak `@control` on their first stream; the proxy opens one QUIC stream per client stream.
//! Clients may dial it too, proving their SSH user certificate the same way, and open one QUIC
//! stream per stream they want.
//!
//! ## Layout
//! - this file: the quinn endpoint ([`endpoint`], [`server_config`]) and the accept loop
//!   [`serve`], with address validation (retry) and the same pre-handshake limits as SSH;
//! - `conn`: one connection: the login on the control stream, then an agent's registration and
//!   control;
//! - `client`: a client's connection: one QUIC stream per stream it opens;
//! - [`splice`]: an SSH channel spliced to a QUIC stream, and two QUIC streams to each other.
//!
//! The wire contract is [`tunnel_proto::quic`].

mod client;
mod conn;
pub mod splice;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics::counter;
use russh::keys::{Certificate, PrivateKey};
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span};

use crate::config::ProxyConfig;
use crate::metrics as m;
use crate::tunnel::TunnelShared;

/// Why the QUIC listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    /// The TLS configuration cannot serve QUIC (it needs TLS 1.3), or the reset key file is
    /// unusable.
    #[error("QUIC set-up: {0}")]
    Tls(String),
    /// The UDP socket could not be set up.
    #[error("QUIC UDP socket {addr}: {source}")]
    Socket {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// What the proxy shows an agent to prove who it is: its SSH host key and certificate, bound to
/// the QUIC connection by a signature over the proxy exporter value.
pub struct ProxyProof {
    /// The SSH host key (signs the binding).
    pub key: PrivateKey,
    /// The host certificate if there is one, else the public key, OpenSSH one-line form;
    /// replaced when the host certificate is renewed ([`crate::renewal`]).
    line: std::sync::RwLock<String>,
}

impl ProxyProof {
    /// The proof for a host key and its optional certificate.
    pub fn new(key: PrivateKey, cert: Option<&Certificate>) -> ProxyProof {
        let line = cert
            .and_then(|c| c.to_openssh().ok())
            .or_else(|| key.public_key().to_openssh().ok())
            .unwrap_or_default();
        ProxyProof {
            key,
            line: std::sync::RwLock::new(line),
        }
    }

    /// The line shown to the next agent.
    pub fn line(&self) -> String {
        self.line.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Shows `cert` (a renewed host certificate for the same key) to the next agents.
    pub fn set_cert(&self, cert: &Certificate) {
        if let Ok(l) = cert.to_openssh() {
            *self.line.write().unwrap_or_else(|e| e.into_inner()) = l;
        }
    }
}

/// The quinn server settings: TLS from the web listener's certificate with the tunnel ALPN,
/// windows from the config, keepalives and idle timeout from the SSH settings.
pub fn server_config(
    web_tls: &rustls::ServerConfig,
    config: &ProxyConfig,
) -> Result<quinn::ServerConfig, QuicError> {
    let mut tls = web_tls.clone();
    tls.alpn_protocols = vec![tunnel_proto::quic::ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| QuicError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut t = quinn::TransportConfig::default();
    // The agent opens one stream (control); the proxy opens the rest.
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window(varint(config.quic.stream_window_bytes));
    t.receive_window(varint(config.quic_connection_window()));
    let keepalive = config.keepalive();
    t.keep_alive_interval(Some(keepalive));
    let idle = keepalive.saturating_mul(config.ssh.keepalive_max as u32 + 1);
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok());
    t.mtu_discovery_config(Some(mtu_discovery(config.quic.mtu_upper_bound)));
    server.transport_config(Arc::new(t));
    // Agents behind NAT may change port; a tunnel is bound to its TLS session, not its address.
    server.migration(true);
    Ok(server)
}

/// Connection ids of 8 bytes: 4 random, then 4 of a MAC of those under the reset key. Like
/// quinn's default generator they let junk be dropped cheaply, but they stay valid across a
/// restart (quinn's own key is random per process), so a restarted proxy recognises its previous
/// run's connection ids and answers them with stateless resets instead of silence.
struct CidGenerator(ring::hmac::Key);

impl CidGenerator {
    fn tag(&self, nonce: &[u8]) -> [u8; 4] {
        let mac = ring::hmac::sign(&self.0, nonce);
        let mut t = [0u8; 4];
        t.copy_from_slice(&mac.as_ref()[..4]);
        t
    }
}

impl quinn::ConnectionIdGenerator for CidGenerator {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let nonce: [u8; 4] = rand::random();
        let mut cid = [0u8; 8];
        cid[..4].copy_from_slice(&nonce);
        cid[4..].copy_from_slice(&self.tag(&nonce));
        quinn::ConnectionId::new(&cid)
    }

    fn validate(&self, cid: &quinn::ConnectionId) -> Result<(), quinn_proto::InvalidCid> {
        if cid.len() == 8 && self.tag(&cid[..4]) == cid[4..] {
            Ok(())
        } else {
            Err(quinn_proto::InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The stateless-reset key in `<data_dir>/quic_reset_key` (32 random bytes, 0600), created on
/// first use.
pub fn reset_key(data_dir: &std::path::Path) -> Result<Vec<u8>, QuicError> {
    let path = data_dir.join("quic_reset_key");
    let err = |e: String| QuicError::Tls(format!("{}: {e}", path.display()));
    match std::fs::read(&path) {
        Ok(k) if k.len() == 32 => Ok(k),
        _ => {
            let key: [u8; 32] = rand::random();
            crate::mint::write_file(&path, &key, 0o600).map_err(|e| err(e.to_string()))?;
            Ok(key.to_vec())
        }
    }
}

pub use postern_dial::quic::{mtu_discovery, varint};

/// Binds the QUIC listener's UDP socket with the configured buffers.
pub fn bind_udp(addr: SocketAddr, buffer: usize) -> Result<std::net::UdpSocket, QuicError> {
    let err = |source| QuicError::Socket { addr, source };
    let socket = std::net::UdpSocket::bind(addr).map_err(err)?;
    let sock = socket2::SockRef::from(&socket);
    let _ = sock.set_recv_buffer_size(buffer);
    let _ = sock.set_send_buffer_size(buffer);
    Ok(socket)
}

/// The quinn endpoint on a bound UDP socket. `reset_key` keys its stateless resets: kept in the
/// data dir, so that a restarted proxy's resets are valid for the connections its previous run
/// held, and their agents learn at their next packet (not at their idle timeout) that the
/// tunnel is gone.
/// It accepts datagrams of up to `mtu_upper_bound` UDP payload bytes (at least quinn's default,
/// 1472).
pub fn endpoint(
    socket: std::net::UdpSocket,
    server: quinn::ServerConfig,
    reset_key: &[u8],
    mtu_upper_bound: u16,
) -> Result<quinn::Endpoint, QuicError> {
    let addr = socket
        .local_addr()
        .unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_key);
    let mut config = quinn::EndpointConfig::new(Arc::new(key.clone()));
    config.cid_generator(move || Box::new(CidGenerator(key.clone())));
    // quinn sends at most one stateless reset per 20 ms by default: after a restart, 500 agents
    // then took 18.7 s to learn their tunnels were gone (50 resets/s). Our connection ids carry a
    // 32-bit MAC, so garbage almost never earns a reset, and a reset is always smaller than the
    // packet that caused it (no amplification): 1 ms (1,000 resets/s) is safe.
    config.min_reset_interval(Duration::from_millis(1));
    // Only fails below 1200, which validation refuses.
    let _ = config.max_udp_payload_size(mtu_upper_bound.max(1472));
    quinn::Endpoint::new(config, Some(server), socket, Arc::new(quinn::TokioRuntime))
        .map_err(|source| QuicError::Socket { addr, source })
}

/// Accepts QUIC connections until `draining` is cancelled. An Initial from an address not yet
/// validated gets a Retry (so a spoofed source cannot make the proxy do handshake work), then the
/// SSH listener's admission applies ([`crate::tunnel::admit_pre_login`]: per-source limits and
/// a fair share of the one pre-login pool both listeners draw from).
pub async fn serve(
    endpoint: quinn::Endpoint,
    shared: Arc<TunnelShared>,
    proof: Arc<ProxyProof>,
    max_unauthenticated: usize,
    conns: TaskTracker,
) {
    loop {
        let incoming = tokio::select! {
            _ = shared.draining.cancelled() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        if !incoming.remote_address_validated() {
            // Stateless: the client must echo the token from its real address.
            let _ = incoming.retry();
            continue;
        }
        let peer = incoming.remote_address();
        // The same admission as an SSH connection: per-source limits, then a fair pre-login
        // slot (refused and counted there).
        let slot = match crate::tunnel::admit_pre_login(&shared, peer, max_unauthenticated) {
            Ok(slot) => slot,
            Err(_) => {
                incoming.refuse();
                continue;
            }
        };
        let connecting = match incoming.accept() {
            Ok(c) => c,
            Err(e) => {
                debug!(%peer, error = %e, "QUIC handshake refused");
                counter!(m::CONNECTIONS_DROPPED, "reason" => "protocol").increment(1);
                continue;
            }
        };
        let span = info_span!("conn", %peer, transport = "quic");
        conns.spawn(
            conn::serve_conn(shared.clone(), proof.clone(), connecting, peer, slot)
                .instrument(span),
        );
    }
    // New connections are refused from here on; live ones drain and are closed at hard stop.
    endpoint.set_server_config(None);
    debug!("QUIC listener stopped accepting");
    let shared2 = shared.clone();
    tokio::spawn(async move {
        shared2.hard_stop.cancelled().await;
        endpoint.close(0u32.into(), b"proxy shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    });
}
