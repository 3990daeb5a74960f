//! The bytes of a stream with a QUIC leg (opened, audited and counted by
//! `tunnel::splice::open_stream`, as on SSH): [`splice`] between an SSH channel and a QUIC stream
//! (a client's channel and a QUIC agent's stream, or a QUIC client's stream and an SSH agent's
//! channel), [`pipe`] between two QUIC streams.
//!
//! No credit layer on a QUIC leg: QUIC's per-stream flow control does what
//! [`tunnel_proto::credit`] does on SSH (toward a channel whose peer speaks credit, the credit
//! layer applies on it as on the SSH transport). A reader that stops stops the proxy reading the
//! other side's QUIC stream; the sender then runs out of that stream's window
//! (`quic.stream_window_bytes`, all the proxy holds for it) and nothing else of the connection is
//! held back, because the connection window covers every stream's.
//!
//! From an SSH channel into QUIC, payload is not copied here: the `Bytes` russh decrypted into
//! (up to 32 KiB each) go to quinn's send buffer. Out of QUIC, quinn hands over one chunk per
//! datagram (about 1,200 bytes), and neither next hop wants them one by one:
//! - toward an SSH channel, each became an SSH packet of its own, with its own trip through
//!   russh's session task, its own MAC and its own syscall, which made the QUIC leg cost about
//!   twice the CPU per byte of the SSH one;
//! - toward another QUIC stream, each became a segment of quinn's send buffer, which finds the
//!   bytes of every packet it sends by walking its segments from the oldest unacknowledged one:
//!   with a window of 1,200-byte segments in flight that walk took 20 % of the proxy's CPU
//!   (`perf`, client and agent on QUIC) and the relay ran 16 % slower.
//!
//! [`read_coalesced`] gathers what is ready into one buffer of up to [`CHUNKS`] chunks (one copy;
//! a lone chunk is passed on as it is).

use bytes::BytesMut;
use metrics::counter;
use russh::Channel;
use russh::server::Msg;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;
use crate::tunnel::queue_cap;

/// The chunks gathered per read: about one SSH packet's worth (32 KiB) of datagrams.
const CHUNKS: usize = 28;

/// Reads what the stream has ready, at least one chunk: a lone chunk as it is, several gathered
/// into `buf` (at most [`CHUNKS`] of them, copied once). `None` once the stream is finished.
pub async fn read_coalesced(
    recv: &mut quinn::RecvStream,
    buf: &mut BytesMut,
) -> Result<Option<bytes::Bytes>, quinn::ReadError> {
    let mut chunks: [bytes::Bytes; CHUNKS] = Default::default();
    let Some(n) = recv.read_chunks(&mut chunks).await? else {
        return Ok(None);
    };
    if n == 1 {
        return Ok(Some(std::mem::take(&mut chunks[0])));
    }
    buf.reserve(chunks[..n].iter().map(|c| c.len()).sum());
    for c in &chunks[..n] {
        buf.extend_from_slice(c);
    }
    Ok(Some(buf.split().freeze()))
}

/// QUIC application error code on a stream whose other side went away.
const CLIENT_GONE: u32 = 1;

/// How one direction ended.
#[derive(PartialEq)]
enum End {
    /// The sender half-closed; passed on.
    Eof,
    /// Reset, closed or failed: the stream is over.
    Closed,
}

/// The SSH side of a [`splice`]: a channel, whether its peer speaks per-stream credit, and the
/// metric labels of its two directions.
pub struct ChannelEnd {
    channel: Channel<Msg>,
    credit: bool,
    /// Direction label of bytes from the channel into QUIC.
    into_quic: &'static str,
    /// Direction label of bytes from QUIC into the channel.
    from_quic: &'static str,
}

impl ChannelEnd {
    /// A client's `direct-tcpip` channel (`credit`: the client speaks credit).
    pub fn client(channel: Channel<Msg>, credit: bool) -> ChannelEnd {
        ChannelEnd {
            channel,
            credit,
            into_quic: "client_to_agent",
            from_quic: "agent_to_client",
        }
    }

    /// An SSH agent's `forwarded-tcpip` channel (`credit`: the agent speaks credit).
    pub fn agent(channel: Channel<Msg>, credit: bool) -> ChannelEnd {
        ChannelEnd {
            channel,
            credit,
            into_quic: "agent_to_client",
            from_quic: "client_to_agent",
        }
    }
}

/// Passes bytes both ways between an SSH channel and a QUIC stream until both directions ended
/// or either side closed. `early` is payload that came on the QUIC stream with its open or its
/// accept. Returns the bytes moved from the channel into QUIC, and from QUIC into the channel.
pub async fn splice(
    end: ChannelEnd,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    early: BytesMut,
    stop: &CancellationToken,
) -> (u64, u64) {
    use postern_dial::splice::{Credit, Item, eager_reader, send_data, send_grant};
    use tunnel_proto::credit::STREAM_WINDOW;
    let (rx, tx) = end.channel.split();
    let up_bytes = counter!(m::BYTES_PROXIED, "direction" => end.into_quic);
    let down_bytes = counter!(m::BYTES_PROXIED, "direction" => end.from_quic);
    let window = STREAM_WINDOW as usize;
    // The channel is drained eagerly (its SSH connection carries its other streams). A peer
    // that speaks credit never has more than a window outstanding here and is granted more as
    // quinn takes it, and the proxy sends it no more than it granted; without credit, the
    // queue's bound holds back only that peer's connection, as on the SSH transport.
    let to_channel = end.credit.then(|| Credit::new(window));
    let (reader, mut queue) = eager_reader(rx, queue_cap(end.credit), to_channel.clone());
    let run = async {
        let up = async {
            let mut total = 0u64;
            while let Some(item) = queue.next().await {
                match item {
                    Item::Data(data) => {
                        let n = data.len();
                        if send.write_chunk(data).await.is_err() {
                            return (total, End::Closed);
                        }
                        if let Some(g) = queue.release(n) {
                            send_grant(&tx, g).await;
                        }
                        total += n as u64;
                        up_bytes.increment(n as u64);
                    }
                    Item::Eof => {
                        let _ = send.finish();
                        return (total, End::Eof);
                    }
                }
            }
            let _ = send.reset(CLIENT_GONE.into());
            (total, End::Closed)
        };
        let down = async {
            let mut total = 0u64;
            if !early.is_empty() {
                total += early.len() as u64;
                down_bytes.increment(early.len() as u64);
                if send_data(&tx, early.freeze(), to_channel.as_ref(), window)
                    .await
                    .is_err()
                {
                    return (total, End::Closed);
                }
            }
            let mut buf = BytesMut::new();
            loop {
                match read_coalesced(&mut recv, &mut buf).await {
                    Ok(Some(data)) => {
                        let n = data.len();
                        if send_data(&tx, data, to_channel.as_ref(), window)
                            .await
                            .is_err()
                        {
                            let _ = recv.stop(CLIENT_GONE.into());
                            return (total, End::Closed);
                        }
                        total += n as u64;
                        down_bytes.increment(n as u64);
                    }
                    Ok(None) => {
                        let _ = Box::pin(tx.eof()).await;
                        return (total, End::Eof);
                    }
                    Err(_) => return (total, End::Closed),
                }
            }
        };
        tokio::pin!(up, down, reader);
        let (mut up_r, mut down_r) = (None, None);
        let mut reader_done = false;
        loop {
            tokio::select! {
                r = &mut up, if up_r.is_none() => up_r = Some(r),
                r = &mut down, if down_r.is_none() => down_r = Some(r),
                _ = &mut reader, if !reader_done => reader_done = true,
            }
            let closed =
                matches!(up_r, Some((_, End::Closed))) || matches!(down_r, Some((_, End::Closed)));
            if closed || (up_r.is_some() && down_r.is_some()) {
                break;
            }
        }
        (up_r.map_or(0, |r| r.0), down_r.map_or(0, |r| r.0))
    };
    let out = tokio::select! {
        r = run => r,
        _ = stop.cancelled() => (0, 0),
    };
    // Whatever is still open is over now: the channel, and the QUIC stream both ways.
    let _ = Box::pin(tx.close()).await;
    (out.0, out.1)
}

/// One side of a [`pipe`]: a QUIC stream, and payload that came on it with its open or accept.
pub type QuicEnd = (quinn::SendStream, quinn::RecvStream, BytesMut);

/// Passes bytes both ways between a QUIC client's stream and a QUIC agent's stream, until both
/// directions ended or either side closed: what one connection received, gathered by
/// [`read_coalesced`], goes to the other's send buffer. Returns the bytes moved client to agent,
/// and agent to client.
pub async fn pipe(client: QuicEnd, agent: QuicEnd, stop: &CancellationToken) -> (u64, u64) {
    let (client_send, client_recv, client_early) = client;
    let (agent_send, agent_recv, agent_early) = agent;
    let up = forward(client_recv, client_early, agent_send, "client_to_agent");
    let down = forward(agent_recv, agent_early, client_send, "agent_to_client");
    let run = async {
        tokio::pin!(up, down);
        let (mut up_r, mut down_r) = (None, None);
        loop {
            tokio::select! {
                r = &mut up, if up_r.is_none() => up_r = Some(r),
                r = &mut down, if down_r.is_none() => down_r = Some(r),
            }
            let closed =
                matches!(up_r, Some((_, End::Closed))) || matches!(down_r, Some((_, End::Closed)));
            if closed || (up_r.is_some() && down_r.is_some()) {
                break;
            }
        }
        (up_r.map_or(0, |r| r.0), down_r.map_or(0, |r| r.0))
    };
    // Dropping a stream's halves resets what is still open of it (quinn's drop).
    tokio::select! {
        r = run => r,
        _ = stop.cancelled() => (0, 0),
    }
}

/// One direction of a [`pipe`]: `early`, then what `recv` delivers, into `send`, until the end.
async fn forward(
    mut recv: quinn::RecvStream,
    early: BytesMut,
    mut send: quinn::SendStream,
    direction: &'static str,
) -> (u64, End) {
    let bytes = counter!(m::BYTES_PROXIED, "direction" => direction);
    let mut total = 0u64;
    let mut next = (!early.is_empty()).then(|| early.freeze());
    let mut buf = BytesMut::new();
    loop {
        let data = match next.take() {
            Some(data) => data,
            None => match read_coalesced(&mut recv, &mut buf).await {
                Ok(Some(data)) => data,
                Ok(None) => {
                    let _ = send.finish();
                    return (total, End::Eof);
                }
                Err(_) => {
                    let _ = send.reset(CLIENT_GONE.into());
                    return (total, End::Closed);
                }
            },
        };
        let len = data.len() as u64;
        if send.write_chunk(data).await.is_err() {
            let _ = recv.stop(CLIENT_GONE.into());
            return (total, End::Closed);
        }
        total += len;
        bytes.increment(len);
    }
}
