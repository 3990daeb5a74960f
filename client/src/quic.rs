//! A session with the proxy over QUIC ([`crate::Transport::Quic`]): the client logs in on the
//! proxy's QUIC listener with its SSH user certificate, by signing the connection's TLS exporter
//! value, checks the proxy's host certificate and its signature the same way, then opens one
//! QUIC stream per stream (`Frame::Open` naming `<target>.<cluster>`).
//!
//! Each stream has QUIC's own flow control: a stream the application stops reading holds back
//! only itself, with no credit layer on top (SSH needs one, see [`crate::TunnelStream`]). The TLS
//! certificate of the QUIC listener is checked as discovery checks the web listener's (a tunnel
//! address given directly is not checked at the TLS layer): what authenticates the proxy is its
//! SSH host certificate, bound to this very TLS session by its signature.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use postern_dial::DialError;
use postern_dial::quic::{
    OpenError, auth_frame, check_proxy_proof, client_endpoint, mtu_discovery, varint,
};
use postern_dial::ssh::ProxyVerifier;
use postern_dial::web::{WebTrust, find, host_of};
use tunnel_proto::frame_stream::FrameStream;
use tunnel_proto::quic::{AGENT_CONTEXT, ALPN, Frame};

use crate::{ClientError, ConnectOptions, ProxyAddr, TunnelStream};

/// How long the QUIC handshake may take ([`crate::Transport::Quic`]): past it UDP is taken to be
/// blocked.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The same with [`crate::Transport::Auto`], which then falls back to SSH: as the agent's.
pub(crate) const AUTO_HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long the login may take after the handshake.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the proxy may take to answer a stream open (it dials the agent first).
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Keepalive interval: well inside NAT and load-balancer UDP timeouts (often 30 s).
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Per-stream receive window: as the SSH credit window.
const STREAM_WINDOW: u64 = tunnel_proto::credit::STREAM_WINDOW as u64;

/// A logged-in QUIC session.
pub(crate) struct QuicLink {
    conn: quinn::Connection,
    /// The session's own UDP socket (closed with the last handle).
    endpoint: quinn::Endpoint,
}

/// The QUIC address of the proxy behind `proxy`: from discovery (the tunnel address's host with
/// the QUIC port it advertises), or a tunnel address's UDP twin.
async fn quic_addr(proxy: &ProxyAddr) -> Result<(String, WebTrust), DialError> {
    match proxy {
        ProxyAddr::Web { addr, trust } => {
            let found = find(addr, trust).await?;
            let env = std::env::var(tunnel_proto::discovery::TUNNEL_ADDR_ENV).ok();
            let tunnel = found.proxy.tunnel_addr(env.as_deref(), host_of(addr));
            let quic = found
                .proxy
                .quic_addr(&tunnel)
                .ok_or_else(|| DialError::Quic {
                    addr: addr.clone(),
                    detail: format!(
                        "the proxy does not offer QUIC (it offers: {}): connect over SSH",
                        found.proxy.transports.join(", ")
                    ),
                })?;
            Ok((quic, trust.clone()))
        }
        ProxyAddr::Tunnel(a) => Ok((a.clone(), WebTrust::Insecure)),
    }
}

fn quic_err(addr: &str, what: impl std::fmt::Display) -> DialError {
    DialError::Quic {
        addr: addr.to_owned(),
        detail: what.to_string(),
    }
}

impl QuicLink {
    /// Discovers the QUIC address, dials it (the handshake bounded by `handshake`, path MTU
    /// discovery by `mtu_upper_bound`) and logs in. Returns the session and its address.
    pub(crate) async fn connect(
        opts: &ConnectOptions,
        handshake: Duration,
        mtu_upper_bound: u16,
    ) -> Result<(QuicLink, String), ClientError> {
        let (addr, trust) = quic_addr(&opts.proxy).await?;
        let target: SocketAddr = tokio::net::lookup_host(&addr)
            .await
            .map_err(|e| quic_err(&addr, e))?
            .next()
            .ok_or_else(|| quic_err(&addr, "no address"))?;
        let endpoint =
            client_endpoint(target.is_ipv6(), mtu_upper_bound).map_err(|e| quic_err(&addr, e))?;
        let mut tls = postern_dial::web::tls_config(&trust)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| quic_err(&addr, e))?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        let mut t = quinn::TransportConfig::default();
        // The proxy opens no stream toward a client.
        t.max_concurrent_bidi_streams(0u32.into());
        t.max_concurrent_uni_streams(0u32.into());
        t.stream_receive_window(varint(STREAM_WINDOW));
        t.keep_alive_interval(Some(KEEPALIVE));
        t.max_idle_timeout(quinn::IdleTimeout::try_from(KEEPALIVE * 4).ok());
        t.mtu_discovery_config(Some(mtu_discovery(mtu_upper_bound)));
        client.transport_config(Arc::new(t));
        let connecting = endpoint
            .connect_with(client, target, host_of(&addr))
            .map_err(|e| quic_err(&addr, e))?;
        let conn = match tokio::time::timeout(handshake, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(quic_err(&addr, format!("handshake failed: {e}")).into()),
            Err(_) => {
                return Err(quic_err(
                    &addr,
                    format!(
                        "no QUIC handshake within {handshake:?}: is UDP blocked on the way, or is QUIC off on the proxy? (connect over SSH)"
                    ),
                )
                .into());
            }
        };
        let verifier = ProxyVerifier::new(
            host_of(&addr),
            opts.proxy_host_cas.clone(),
            opts.proxy_host_keys.clone(),
        );
        match tokio::time::timeout(LOGIN_TIMEOUT, login(&conn, opts, &verifier, &addr)).await {
            Ok(Ok(())) => Ok((QuicLink { conn, endpoint }, addr)),
            Ok(Err(e)) => {
                conn.close(0u32.into(), b"login failed");
                Err(e.into())
            }
            Err(_) => {
                conn.close(0u32.into(), b"login timeout");
                Err(quic_err(&addr, "login timed out").into())
            }
        }
    }

    /// Opens a stream to `host` (`<target>.<cluster>`).
    pub(crate) async fn open(&self, host: &str, port: u32) -> Result<TunnelStream, ClientError> {
        match postern_dial::quic::open_stream(&self.conn, host, port, "127.0.0.1", 0, OPEN_TIMEOUT)
            .await
        {
            Ok((send, recv, early)) => Ok(TunnelStream::quic(
                send,
                recv,
                early.freeze(),
                self.endpoint.clone(),
            )),
            Err(e) => Err(ClientError::Refused {
                host: host.to_owned(),
                reason: match (self.closed_reason(), e) {
                    (Some(why), _) => format!("the proxy closed the connection: {why}"),
                    (None, OpenError::Refused(why)) => why,
                    (None, OpenError::Timeout) => {
                        format!("the proxy did not answer in {OPEN_TIMEOUT:?}")
                    }
                },
            }),
        }
    }

    /// Why the proxy closed the connection, if it did and said (a lock's message).
    pub(crate) fn closed_reason(&self) -> Option<String> {
        match self.conn.close_reason()? {
            quinn::ConnectionError::ApplicationClosed(c) => {
                Some(String::from_utf8_lossy(&c.reason).into_owned()).filter(|r| !r.is_empty())
            }
            e => Some(e.to_string()),
        }
    }
}

/// The login on the first stream: our certificate and binding, then the proxy's proof.
async fn login(
    conn: &quinn::Connection,
    opts: &ConnectOptions,
    verifier: &ProxyVerifier,
    addr: &str,
) -> Result<(), DialError> {
    let (send, recv) = conn.open_bi().await.map_err(|e| quic_err(addr, e))?;
    let mut control = FrameStream::new(send, recv);
    let auth = auth_frame(
        conn,
        AGENT_CONTEXT,
        opts.user.clone(),
        &opts.identity.key,
        &opts.identity.cert,
    )
    .map_err(|e| quic_err(addr, e))?;
    control
        .write(&[auth])
        .await
        .map_err(|e| quic_err(addr, e))?;
    match control.read().await.map_err(|e| quic_err(addr, e))? {
        Frame::ProxyAuth { key, signature } => check_proxy_proof(conn, &key, &signature, verifier)
            .map_err(|detail| DialError::HostVerification {
                addr: addr.to_owned(),
                detail,
            }),
        Frame::Refused { reason } => Err(DialError::Refused {
            addr: addr.to_owned(),
            reason,
        }),
        other => Err(quic_err(
            addr,
            format!("unexpected answer to the login: {other:?}"),
        )),
    }
}
