//! The QUIC pieces every dialler of a proxy shares (the agent, and a client that logs in over
//! QUIC): the client endpoint, the login's channel binding, the check of the proxy's proof, and
//! opening a stream with [`Frame::Open`]. The proxy opens its streams to agents the same way.
//!
//! The wire contract is [`tunnel_proto::quic`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use russh::keys::{Certificate, PrivateKey, PublicKey, PublicKeyOrCertificate};
use tunnel_proto::quic::{
    EXPORTER_LABEL, EXPORTER_LEN, Frame, PROXY_CONTEXT, sign_binding, verify_binding,
};

use crate::ssh::ProxyVerifier;

/// UDP socket buffers of a client endpoint: quinn leaves the kernel's default (about 208 KiB),
/// which dropped about 1 % of datagrams under load.
const SOCKET_BUFFER: usize = 4 << 20;

/// A client endpoint (no server role) on a UDP socket of its own, for the address family of
/// `v6`, accepting datagrams of up to `mtu_upper_bound` UDP payload bytes (at least quinn's
/// default, 1472).
pub fn client_endpoint(v6: bool, mtu_upper_bound: u16) -> std::io::Result<quinn::Endpoint> {
    let bind: SocketAddr = if v6 {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        ([0, 0, 0, 0], 0).into()
    };
    let socket = std::net::UdpSocket::bind(bind)?;
    let sock = socket2::SockRef::from(&socket);
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    let mut ec = quinn::EndpointConfig::default();
    // Only fails below 1200, which config validation refuses.
    let _ = ec.max_udp_payload_size(mtu_upper_bound.max(1472));
    quinn::Endpoint::new(ec, None, socket, Arc::new(quinn::TokioRuntime))
}

/// A window value for quinn, clamped to what QUIC can carry.
pub fn varint(v: u64) -> quinn::VarInt {
    quinn::VarInt::from_u64(v.min((1 << 62) - 1)).unwrap_or(quinn::VarInt::MAX)
}

/// Path MTU discovery up to `upper_bound` UDP payload bytes (quinn's other defaults kept).
pub fn mtu_discovery(upper_bound: u16) -> quinn::MtuDiscoveryConfig {
    let mut d = quinn::MtuDiscoveryConfig::default();
    d.upper_bound(upper_bound);
    d
}

/// This connection's exporter value for `context` (equal on both ends, new for every
/// connection).
pub fn exporter(conn: &quinn::Connection, context: &[u8]) -> Result<[u8; EXPORTER_LEN], String> {
    let mut out = [0u8; EXPORTER_LEN];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, context)
        .map_err(|_| "TLS exporter unavailable".to_string())?;
    Ok(out)
}

/// The login frame of `login` with `cert`: the certificate and a signature with its key over
/// this connection's exporter value for `context` (an agent's or a client's).
pub fn auth_frame(
    conn: &quinn::Connection,
    context: &[u8],
    login: String,
    key: &PrivateKey,
    cert: &Certificate,
) -> Result<Frame, String> {
    let signature = sign_binding(key, &exporter(conn, context)?).map_err(|e| e.to_string())?;
    Ok(Frame::AgentAuth {
        login,
        cert: cert.to_openssh().map_err(|e| e.to_string())?,
        signature,
    })
}

/// Checks the proxy's [`Frame::ProxyAuth`]: its host certificate (or pinned plain key) as SSH
/// checks it, and its signature over this connection's proxy exporter value, so that the TLS
/// session is the proxy's own (not a relay's). `Err` says why, for the user.
pub fn check_proxy_proof(
    conn: &quinn::Connection,
    key: &str,
    signature: &str,
    verifier: &ProxyVerifier,
) -> Result<(), String> {
    let (presented, public) = match Certificate::from_openssh(key.trim()) {
        Ok(cert) => {
            let public = PublicKey::from(cert.public_key().clone());
            (PublicKeyOrCertificate::Certificate(cert), public)
        }
        Err(_) => {
            let k = PublicKey::from_openssh(key.trim())
                .map_err(|e| format!("the proxy's key is unreadable: {e}"))?;
            (
                PublicKeyOrCertificate::PublicKey {
                    key: k.clone(),
                    hash_alg: None,
                },
                k,
            )
        }
    };
    if !verifier.verify(&presented) {
        return Err(format!(
            "the proxy's host certificate is not trusted (proxy_host_ca / proxy_host_keys): {}",
            verifier
                .take_error()
                .unwrap_or_else(|| "not signed by a trusted host CA".into())
        ));
    }
    verify_binding(&public, &exporter(conn, PROXY_CONTEXT)?, signature)
        .map_err(|e| format!("the proxy's proof: {e}"))
}

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The far side refused (its reason), or the connection failed.
    #[error("{0}")]
    Refused(String),
    /// No answer in time.
    #[error("no answer in time")]
    Timeout,
}

/// Opens a bidirectional stream for `target`: writes [`Frame::Open`] and waits (at most
/// `timeout`) for [`Frame::Accept`] or [`Frame::Refuse`]. Returns the stream's halves and any
/// payload that arrived with the answer.
pub async fn open_stream(
    conn: &quinn::Connection,
    target: &str,
    port: u32,
    originator: &str,
    originator_port: u32,
    timeout: Duration,
) -> Result<(quinn::SendStream, quinn::RecvStream, BytesMut), OpenError> {
    let open = async {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| OpenError::Refused(format!("QUIC connection: {e}")))?;
        let mut head = BytesMut::new();
        Frame::Open {
            target: target.to_owned(),
            port,
            originator: originator.to_owned(),
            originator_port,
        }
        .encode(&mut head)
        .map_err(|e| OpenError::Refused(e.to_string()))?;
        send.write_all(&head)
            .await
            .map_err(|e| OpenError::Refused(format!("QUIC stream: {e}")))?;
        let mut buf = BytesMut::new();
        loop {
            match Frame::decode_from(&mut buf) {
                Ok(Frame::Accept) => return Ok((send, recv, buf)),
                Ok(Frame::Refuse { reason }) => return Err(OpenError::Refused(reason)),
                Ok(other) => {
                    return Err(OpenError::Refused(format!(
                        "a stream open was answered with {other:?}"
                    )));
                }
                Err(tunnel_proto::control::DecodeError::Incomplete) => {}
                Err(e) => return Err(OpenError::Refused(e.to_string())),
            }
            match recv.read_chunk(64 * 1024, true).await {
                Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
                Ok(None) => return Err(OpenError::Refused("the stream was closed".into())),
                Err(e) => return Err(OpenError::Refused(format!("QUIC stream: {e}"))),
            }
        }
    };
    tokio::time::timeout(timeout, open)
        .await
        .map_err(|_| OpenError::Timeout)?
}

/// What a stream's opener asked for ([`Frame::Open`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAsk {
    /// The target (an agent's target name; from a client, `<target>.<cluster>`).
    pub target: String,
    /// The port asked for (passed on, as on SSH).
    pub port: u32,
    /// The opener's address, for logs.
    pub originator: String,
    /// The opener's port.
    pub originator_port: u32,
}

/// Reads the [`Frame::Open`] that starts a stream the peer opened (at most `timeout`): what it
/// asks for, and any payload that came after it. `None` for anything else, or no frame in time.
pub async fn read_open(
    recv: &mut quinn::RecvStream,
    timeout: Duration,
) -> Option<(OpenAsk, BytesMut)> {
    let mut buf = BytesMut::new();
    let frame = tokio::time::timeout(timeout, async {
        loop {
            match Frame::decode_from(&mut buf) {
                Ok(f) => return Some(f),
                Err(tunnel_proto::control::DecodeError::Incomplete) => {}
                Err(_) => return None,
            }
            match recv.read_chunk(64 * 1024, true).await {
                Ok(Some(c)) => buf.extend_from_slice(&c.bytes),
                _ => return None,
            }
        }
    })
    .await
    .ok()??;
    match frame {
        Frame::Open {
            target,
            port,
            originator,
            originator_port,
        } => Some((
            OpenAsk {
                target,
                port,
                originator,
                originator_port,
            },
            buf,
        )),
        _ => None,
    }
}

/// Answers a stream open with [`Frame::Accept`]: payload may follow.
pub async fn accept(send: &mut quinn::SendStream) -> Result<(), quinn::WriteError> {
    let mut out = BytesMut::new();
    let _ = Frame::Accept.encode(&mut out);
    send.write_all(&out).await
}

/// Refuses a stream open with `reason` and ends the stream (waiting at most 5 s for the peer to
/// take the answer).
pub async fn refuse(send: &mut quinn::SendStream, reason: String) {
    let mut out = BytesMut::new();
    let reason: String = reason.chars().take(1000).collect();
    let _ = Frame::Refuse { reason }.encode(&mut out);
    let _ = send.write_all(&out).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
}
