//! A client stream, either transport on either side: the agent side opened on the tunnel's link,
//! the client answered, the audit and metrics, then bytes passed both ways: [`splice`] between two
//! SSH channels, [`crate::quic::splice`] between an SSH channel and a QUIC stream, and
//! [`crate::quic::splice::pipe`] between two QUIC streams.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::BytesMut;
use metrics::{counter, gauge};
use postern_dial::splice::{Credit, peer_version};
use russh::server::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelOpenFailure};
use tokio_util::sync::CancellationToken;
use tracing::debug;
use tunnel_proto::credit::{CREDIT_VERSION, STREAM_WINDOW};

use crate::link::{AgentStream, OpenError};
use crate::metrics as m;
use crate::quic::splice as quic;
use crate::routing::Tunnel;

use super::streams::{Decided, record_refused};

use super::*;

/// The client's end of a stream, before it is answered.
pub(crate) enum ClientEnd {
    /// A `direct-tcpip` channel and its open request's answer.
    Ssh {
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
    },
    /// A QUIC stream the client opened with `Frame::Open`, and payload that came after it.
    Quic {
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        early: BytesMut,
    },
}

/// The client's end once answered: what the splice moves bytes on.
enum ClientSide {
    Ssh(Channel<Msg>),
    Quic {
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        early: BytesMut,
    },
}

impl ClientEnd {
    /// Refuses the stream, saying why.
    async fn refuse(self, why: String) {
        match self {
            ClientEnd::Ssh { reply, .. } => {
                reply
                    .reject(reject_reason(ChannelOpenFailure::ConnectFailed, why))
                    .await
            }
            ClientEnd::Quic { mut send, .. } => postern_dial::quic::refuse(&mut send, why).await,
        }
    }

    /// Tells the client the stream is open.
    async fn accept(self) -> Option<ClientSide> {
        match self {
            ClientEnd::Ssh { channel, reply } => {
                reply.accept().await;
                Some(ClientSide::Ssh(channel))
            }
            ClientEnd::Quic {
                mut send,
                recv,
                early,
            } => {
                postern_dial::quic::accept(&mut send).await.ok()?;
                Some(ClientSide::Quic { send, recv, early })
            }
        }
    }
}

/// Opens the agent side of a decided stream, answers the client, then splices.
pub(crate) async fn open_stream(
    shared: Arc<TunnelShared>,
    decided: Decided,
    open: OpenRequest,
    client: ClientEnd,
) {
    let Decided {
        tunnel,
        target,
        held: _held,
    } = decided;
    let mut open = open;
    open.info.transport = tunnel.link.transport();
    let opened = tunnel
        .link
        .open_stream(
            &target.target,
            open.port,
            &open.originator.0,
            open.originator.1,
            AGENT_OPEN_TIMEOUT,
        )
        .await;
    let agent = match opened {
        Ok(agent) => agent,
        Err(OpenError::Refused(e)) => {
            let why = format!(
                "agent {} of cluster {} could not open target {}: {e}",
                tunnel.host_id, target.cluster, target.target
            );
            record_refused(&shared, &open, "agent_refused", &why);
            client.refuse(why).await;
            return;
        }
        Err(OpenError::Timeout) => {
            let why = "agent did not answer in time";
            record_refused(&shared, &open, "agent_timeout", why);
            client.refuse(why.into()).await;
            return;
        }
    };
    // Spooled before the client hears the stream is open: no answered stream goes unaudited.
    shared.audit.opened(&open.info);
    let opened = std::time::Instant::now();
    let Some(client) = client.accept().await else {
        shared
            .audit
            .closed(&open.info, 0, 0, opened.elapsed(), "client went away");
        return;
    };
    counter!(m::STREAM_OPENS, "result" => "ok").increment(1);
    tunnel.active_streams.fetch_add(1, Ordering::Relaxed);
    gauge!(m::STREAMS_ACTIVE).increment(1.0);
    debug!("stream open");
    let stop = &shared.hard_stop;
    let (up, down) = match (client, agent) {
        (ClientSide::Ssh(channel), AgentStream::Ssh(agent)) => {
            let credit = Credits {
                agent: agent_credit(&tunnel).await,
                client: open.client_credit,
            };
            splice(channel, agent, stop, credit).await
        }
        // QUIC's own per-stream flow control does what the credit layer does on SSH. Boxed:
        // their state is larger than the SSH splice's, and every stream's task would otherwise
        // be sized for it.
        (ClientSide::Ssh(channel), AgentStream::Quic { send, recv, early }) => {
            let end = quic::ChannelEnd::client(channel, open.client_credit);
            Box::pin(quic::splice(end, send, recv, early, stop)).await
        }
        (ClientSide::Quic { send, recv, early }, AgentStream::Ssh(agent)) => {
            let end = quic::ChannelEnd::agent(agent, agent_credit(&tunnel).await);
            let (down, up) = Box::pin(quic::splice(end, send, recv, early, stop)).await;
            (up, down)
        }
        (
            ClientSide::Quic { send, recv, early },
            AgentStream::Quic {
                send: agent_send,
                recv: agent_recv,
                early: agent_early,
            },
        ) => {
            Box::pin(quic::pipe(
                (send, recv, early),
                (agent_send, agent_recv, agent_early),
                stop,
            ))
            .await
        }
    };
    let why = if shared.hard_stop.is_cancelled() {
        "proxy shutting down"
    } else {
        ""
    };
    shared
        .audit
        .closed(&open.info, up, down, opened.elapsed(), why);
    tunnel.active_streams.fetch_sub(1, Ordering::Relaxed);
    gauge!(m::STREAMS_ACTIVE).decrement(1.0);
    debug!(
        client_to_agent = up,
        agent_to_client = down,
        "stream closed"
    );
}

/// Whether the tunnel's agent speaks per-stream credit: its control hello says (normally long
/// since arrived; a stream racing the agent's first hello waits for it).
async fn agent_credit(tunnel: &Tunnel) -> bool {
    peer_version(tunnel.agent_version.subscribe()).await >= CREDIT_VERSION
}

/// Bytes a splice direction may hold from a peer without credit (an OpenSSH client, or an agent
/// older than [`CREDIT_VERSION`]) while its writer waits; past that the peer's own connection is
/// held back.
pub const SPLICE_QUEUE_CAP: usize = 4 << 20;

/// The bound of the queue a splice reads a peer's channel into: one credit window when the peer
/// speaks credit (it never has more outstanding), [`SPLICE_QUEUE_CAP`] otherwise.
pub fn queue_cap(peer_speaks_credit: bool) -> usize {
    if peer_speaks_credit {
        STREAM_WINDOW as usize
    } else {
        SPLICE_QUEUE_CAP
    }
}

/// Which ends of a stream speak per-stream credit ([`tunnel_proto::credit`]).
#[derive(Clone, Copy, Debug)]
pub struct Credits {
    /// The agent (its `@control` hello).
    pub agent: bool,
    /// The client (its SSH identification string: Postern's client SDK).
    pub client: bool,
}

/// Passes channel messages both ways until both sides close. Payload moves as the `Bytes` russh
/// decrypted into, straight to the other channel's encrypter: no copy buffer on the proxy.
///
/// `a` is the client's channel and `b` the agent's. Toward each end that speaks credit
/// ([`Credits`]), the proxy sends no more than that end granted, and that end never has more
/// than one window of this stream outstanding at the proxy: a slow or stopped reader holds at
/// most one window here and stalls only its own stream, and neither session loop ever blocks
/// (a blocked loop also stops reading the window adjustments the other direction waits for,
/// which could deadlock a stream that writes and reads at once). See [`postern_dial::splice`].
pub async fn splice(
    a: Channel<Msg>,
    b: Channel<Msg>,
    stop: &CancellationToken,
    credit: Credits,
) -> (u64, u64) {
    let (a_rx, a_tx) = a.split();
    let (b_rx, b_tx) = b.split();
    let window = STREAM_WINDOW as usize;
    // Our credit to send to each end: its grants arrive on its own channel.
    let to_agent = credit.agent.then(|| Credit::new(window));
    let to_client = credit.client.then(|| Credit::new(window));
    let run = async {
        let (up_reader, up) = pump(
            a_rx,
            &a_tx,
            &b_tx,
            Flow {
                direction: "client_to_agent",
                cap: queue_cap(credit.client),
                grants_in: to_client.clone(),
                grant_back: credit.client,
                send_credit: to_agent.as_ref(),
            },
        );
        let (down_reader, down) = pump(
            b_rx,
            &b_tx,
            &a_tx,
            Flow {
                direction: "agent_to_client",
                cap: queue_cap(credit.agent),
                grants_in: to_agent.clone(),
                grant_back: credit.agent,
                send_credit: to_client.as_ref(),
            },
        );
        tokio::pin!(up, down, up_reader, down_reader);
        let (mut up_r, mut down_r) = (None, None);
        let (mut up_read, mut down_read) = (false, false);
        // Until both directions saw EOF, or either side closed its channel (a client that drops
        // its stream sends CLOSE without EOF): then the whole stream is over. The readers run
        // until their channel closes, even past its EOF: the agent's channel also carries its
        // credit grants for the other direction.
        loop {
            tokio::select! {
                r = &mut up, if up_r.is_none() => up_r = Some(r),
                r = &mut down, if down_r.is_none() => down_r = Some(r),
                _ = &mut up_reader, if !up_read => up_read = true,
                _ = &mut down_reader, if !down_read => down_read = true,
            }
            let closed =
                matches!(up_r, Some((_, End::Closed))) || matches!(down_r, Some((_, End::Closed)));
            if closed || (up_r.is_some() && down_r.is_some()) {
                break;
            }
        }
        // Close both channels, so that neither peer waits for the other's CLOSE, and free the
        // stream's task and slots now: a direction still running is dropped (its bytes were
        // counted in the metric as they moved).
        let _ = Box::pin(a_tx.close()).await;
        let _ = Box::pin(b_tx.close()).await;
        (up_r.map_or(0, |r| r.0), down_r.map_or(0, |r| r.0))
    };
    tokio::select! {
        r = run => r,
        _ = stop.cancelled() => (0, 0),
    }
}

/// How one direction of a stream ended.
enum End {
    /// The sender half-closed (EOF, passed on); the other direction may go on.
    Eof,
    /// The channel closed or failed: the stream is over.
    Closed,
}

/// How one direction moves.
struct Flow<'a> {
    /// Metric label.
    direction: &'static str,
    /// Queue bound for what the sender sent.
    cap: usize,
    /// Credit grants arriving on the read channel are added here.
    grants_in: Option<Credit>,
    /// Whether to grant the sender credit back (on its own channel) as bytes are passed on.
    grant_back: bool,
    /// Credit to spend before each write (the receiver's grants).
    send_credit: Option<&'a Credit>,
}

/// One direction: a reader that takes the channel's messages at once (run it until the channel
/// closes), and a writer that moves them until EOF or the channel's end and returns the bytes
/// moved. `rx_tx` is the write half of the channel read from (grants go back on it); `tx` the
/// channel written to.
fn pump<'a>(
    rx: russh::ChannelReadHalf,
    rx_tx: &'a russh::ChannelWriteHalf<Msg>,
    tx: &'a russh::ChannelWriteHalf<Msg>,
    flow: Flow<'a>,
) -> (
    impl Future<Output = ()> + Send + 'a,
    impl Future<Output = (u64, End)> + Send + 'a,
) {
    use postern_dial::splice::{Item, eager_reader, send_data, send_grant};
    let bytes = counter!(m::BYTES_PROXIED, "direction" => flow.direction);
    let window = STREAM_WINDOW as usize;
    let (reader, mut queue) = eager_reader(rx, flow.cap, flow.grants_in);
    let grant_back = flow.grant_back;
    let send_credit = flow.send_credit;
    let writer = async move {
        let mut total = 0u64;
        while let Some(item) = queue.next().await {
            match item {
                Item::Data(data) => {
                    let n = data.len();
                    if send_data(tx, data, send_credit, window).await.is_err() {
                        return (total, End::Closed);
                    }
                    if let Some(g) = queue.release(n)
                        && grant_back
                    {
                        send_grant(rx_tx, g).await;
                    }
                    total += n as u64;
                    bytes.increment(n as u64);
                }
                Item::Eof => {
                    let _ = Box::pin(tx.eof()).await;
                    return (total, End::Eof);
                }
            }
        }
        (total, End::Closed)
    };
    (reader, writer)
}
