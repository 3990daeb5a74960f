//! A tunnel's link to its agent, whatever the transport: how the proxy opens a stream to one of
//! the agent's targets.
//!
//! The routing table holds tunnels of both transports side by side; a client stream (over SSH or
//! QUIC) is spliced to an SSH channel or to a QUIC stream depending on the link of the tunnel it
//! was routed to.

use std::pin::Pin;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

/// Transport label of SSH tunnels (metrics, logs).
pub const SSH: &str = "ssh";
/// Transport label of QUIC tunnels.
pub const QUIC: &str = "quic";

/// How the proxy reaches an agent.
#[derive(Clone)]
pub enum TunnelLink {
    /// SSH over TCP: streams are `forwarded-tcpip` channels.
    Ssh(russh::server::Handle),
    /// QUIC: streams are bidirectional QUIC streams opened by the proxy.
    Quic(quinn::Connection),
}

impl From<russh::server::Handle> for TunnelLink {
    fn from(h: russh::server::Handle) -> Self {
        TunnelLink::Ssh(h)
    }
}

impl From<quinn::Connection> for TunnelLink {
    fn from(c: quinn::Connection) -> Self {
        TunnelLink::Quic(c)
    }
}

/// A byte stream to a target through a tunnel, either transport.
pub type StreamIo = Pin<Box<dyn AsyncReadWrite>>;

/// `AsyncRead + AsyncWrite`, boxed.
pub trait AsyncReadWrite: AsyncRead + AsyncWrite + Send {}
impl<T: AsyncRead + AsyncWrite + Send> AsyncReadWrite for T {}

/// Why a stream could not be opened on a link.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The agent refused (its reason), or the transport failed.
    #[error("{0}")]
    Refused(String),
    /// The agent did not answer in time.
    #[error("agent did not answer in time")]
    Timeout,
}

impl TunnelLink {
    /// `ssh` or `quic`.
    pub fn transport(&self) -> &'static str {
        match self {
            TunnelLink::Ssh(_) => SSH,
            TunnelLink::Quic(_) => QUIC,
        }
    }

    /// Opens a stream to `target` on the agent: a `forwarded-tcpip` channel on SSH, a QUIC stream
    /// answered with `Frame::Accept` on QUIC ([`postern_dial::quic::open_stream`]).
    pub async fn open_stream(
        &self,
        target: &str,
        port: u32,
        originator: &str,
        originator_port: u32,
        timeout: Duration,
    ) -> Result<AgentStream, OpenError> {
        match self {
            TunnelLink::Ssh(h) => {
                let ch = tokio::time::timeout(
                    timeout,
                    h.channel_open_forwarded_tcpip(
                        target.to_owned(),
                        port,
                        originator.to_owned(),
                        originator_port,
                    ),
                )
                .await
                .map_err(|_| OpenError::Timeout)?
                .map_err(|e| OpenError::Refused(e.to_string()))?;
                Ok(AgentStream::Ssh(ch))
            }
            TunnelLink::Quic(c) => {
                use postern_dial::quic::{OpenError as E, open_stream};
                let (send, recv, early) =
                    open_stream(c, target, port, originator, originator_port, timeout)
                        .await
                        .map_err(|e| match e {
                            E::Refused(why) => OpenError::Refused(why),
                            E::Timeout => OpenError::Timeout,
                        })?;
                Ok(AgentStream::Quic { send, recv, early })
            }
        }
    }

    /// Opens a stream to `target` and returns it as plain bytes (used by the login relay and the
    /// policy watch; client streams are spliced from [`TunnelLink::open_stream`] without copies).
    pub async fn open_io(
        &self,
        target: &str,
        port: u32,
        originator: &str,
        originator_port: u32,
        timeout: Duration,
    ) -> Result<StreamIo, OpenError> {
        use tokio::io::AsyncReadExt;
        match self
            .open_stream(target, port, originator, originator_port, timeout)
            .await?
        {
            AgentStream::Ssh(ch) => Ok(Box::pin(ch.into_stream())),
            AgentStream::Quic { send, recv, early } => {
                let recv = std::io::Cursor::new(early.to_vec()).chain(recv);
                Ok(Box::pin(tokio::io::join(recv, send)))
            }
        }
    }

    /// Closes the agent's connection, telling it why (an SSH disconnect message, a QUIC close
    /// reason).
    pub async fn close(&self, reason: &str) {
        match self {
            TunnelLink::Ssh(h) => {
                let _ = h
                    .disconnect(
                        russh::Disconnect::ByApplication,
                        reason.to_owned(),
                        String::new(),
                    )
                    .await;
            }
            TunnelLink::Quic(c) => close_quic(c, reason),
        }
    }
}

/// Closes a QUIC connection with `reason` (its first 200 characters) as the close reason, under
/// [`CLOSED_BY_PROXY`]: an agent's or a client's, which logs or returns it.
pub fn close_quic(conn: &quinn::Connection, reason: &str) {
    let why: String = reason.chars().take(200).collect();
    conn.close(CLOSED_BY_PROXY.into(), why.as_bytes());
}

/// QUIC application error code of a connection the proxy closed with a reason (a lock, a newer
/// tunnel of the same host id).
pub const CLOSED_BY_PROXY: u32 = 3;

/// The agent side of a client stream, as the link opened it.
pub enum AgentStream {
    /// A `forwarded-tcpip` channel.
    Ssh(russh::Channel<russh::server::Msg>),
    /// A QUIC stream, and payload that arrived with the agent's accept.
    Quic {
        /// Towards the agent.
        send: quinn::SendStream,
        /// From the agent.
        recv: quinn::RecvStream,
        /// Payload read together with the accept frame.
        early: BytesMut,
    },
}
