//! The bytes of a client stream routed to a QUIC tunnel: the client's SSH channel spliced to one
//! QUIC stream (opened, audited and counted by `tunnel::splice::open_stream`, as on SSH).
//!
//! No credit layer toward the agent: QUIC's per-stream flow control does what
//! [`tunnel_proto::credit`] does on SSH (toward a client that speaks credit, the credit layer
//! applies on its SSH channel as on the SSH transport). A client that stops reading stops the
//! proxy reading its QUIC stream; the agent then runs out of that stream's window (`quic.stream_window_bytes`, all the proxy holds for it) and
//! nothing else of the tunnel is held back, because the connection window covers every stream's.
//!
//! Toward the agent, payload is not copied here: the `Bytes` russh decrypted into go to quinn's
//! send buffer. Toward the client, quinn hands over one chunk per datagram (about 1,200 bytes);
//! passed on one by one, each became an SSH packet of its own, with its own trip through russh's
//! session task, its own MAC and its own syscall, which made the QUIC leg cost about twice the
//! CPU per byte of the SSH one. [`read_coalesced`] gathers what is ready into one buffer of up
//! to [`CHUNKS`] chunks (one copy; a lone chunk is passed on as it is).

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

/// QUIC application error code on a stream the client abandoned.
const CLIENT_GONE: u32 = 1;

/// How one direction ended.
#[derive(PartialEq)]
enum End {
    /// The sender half-closed; passed on.
    Eof,
    /// Reset, closed or failed: the stream is over.
    Closed,
}

/// Passes bytes both ways between a client's channel and a QUIC stream until both directions
/// ended or either side closed. `early` is payload that arrived with the agent's accept.
pub async fn splice(
    client: Channel<Msg>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    early: BytesMut,
    stop: &CancellationToken,
    client_credit: bool,
) -> (u64, u64) {
    use postern_dial::splice::{Credit, Item, eager_reader, send_data, send_grant};
    use tunnel_proto::credit::STREAM_WINDOW;
    let (rx, tx) = client.split();
    let up_bytes = counter!(m::BYTES_PROXIED, "direction" => "client_to_agent");
    let down_bytes = counter!(m::BYTES_PROXIED, "direction" => "agent_to_client");
    let window = STREAM_WINDOW as usize;
    // The client's channel is drained eagerly (its SSH connection carries its other streams).
    // A client that speaks credit never has more than a window outstanding here and is granted
    // more as quinn takes it, and the proxy sends it no more than it granted; without credit,
    // the queue's bound holds back only this client's connection, as on the SSH transport.
    let to_client = client_credit.then(|| Credit::new(window));
    let (reader, mut queue) = eager_reader(rx, queue_cap(client_credit), to_client.clone());
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
                if send_data(&tx, early.freeze(), to_client.as_ref(), window)
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
                        if send_data(&tx, data, to_client.as_ref(), window)
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
    // Whatever is still open is over now: the client's channel, and the QUIC stream both ways.
    let _ = Box::pin(tx.close()).await;
    (out.0, out.1)
}
