//! A client stream: the agent side opened, then bytes passed both ways.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use metrics::{counter, gauge};
use russh::server::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelOpenFailure};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};
use tunnel_proto::names::StreamTarget;

use crate::metrics as m;
use crate::routing::Tunnel;

use super::*;

/// Opens the agent side of a stream, answers the client, then splices.
pub(super) async fn open_stream(
    shared: Arc<TunnelShared>,
    tunnel: Arc<Tunnel>,
    target: StreamTarget,
    open: OpenRequest,
    client: Channel<Msg>,
    reply: ChannelOpenHandle,
) {
    let agent = tokio::time::timeout(
        AGENT_OPEN_TIMEOUT,
        tunnel.handle.channel_open_forwarded_tcpip(
            target.target.clone(),
            open.port,
            open.originator.0.clone(),
            open.originator.1,
        ),
    )
    .await;
    let agent = match agent {
        Ok(Ok(ch)) => ch,
        Ok(Err(e)) => {
            let why = format!(
                "agent {} of cluster {} could not open target {}: {e}",
                tunnel.host_id, target.cluster, target.target
            );
            info!(%why, "stream refused");
            counter!(m::STREAM_OPENS, "result" => "agent_refused").increment(1);
            shared.audit.refused(&open.info, "agent_refused", &why);
            reply
                .reject(reject_reason(ChannelOpenFailure::ConnectFailed, why))
                .await;
            return;
        }
        Err(_) => {
            counter!(m::STREAM_OPENS, "result" => "agent_timeout").increment(1);
            shared
                .audit
                .refused(&open.info, "agent_timeout", "agent did not answer in time");
            reply
                .reject(reject_reason(
                    ChannelOpenFailure::ConnectFailed,
                    "agent did not answer in time",
                ))
                .await;
            return;
        }
    };
    // Spooled before the client hears the stream is open: no answered stream goes unaudited.
    shared.audit.opened(&open.info);
    let opened = std::time::Instant::now();
    reply.accept().await;
    counter!(m::STREAM_OPENS, "result" => "ok").increment(1);
    tunnel.active_streams.fetch_add(1, Ordering::Relaxed);
    gauge!(m::STREAMS_ACTIVE).increment(1.0);
    debug!("stream open");
    let (up, down) = splice(client, agent, &shared.hard_stop).await;
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

/// Bytes a splice direction may hold while its writer waits for the peer's window.
pub const SPLICE_QUEUE_CAP: usize = 4 << 20;

/// Passes channel messages both ways until both sides close. Payload moves as the `Bytes` russh
/// decrypted into, straight to the other channel's encrypter: no copy buffer on the proxy. The
/// writer waits for the peer's SSH window, so a slow reader slows its writer; see
/// [`postern_dial::splice`] for why each direction is read eagerly into a bounded queue.
pub async fn splice(a: Channel<Msg>, b: Channel<Msg>, stop: &CancellationToken) -> (u64, u64) {
    let (a_rx, a_tx) = a.split();
    let (b_rx, b_tx) = b.split();
    let run = async {
        let up = pump(a_rx, &b_tx, "client_to_agent");
        let down = pump(b_rx, &a_tx, "agent_to_client");
        tokio::pin!(up);
        tokio::pin!(down);
        let (mut up_r, mut down_r) = (None, None);
        // Until both directions saw EOF, or either side closed its channel (a client that drops
        // its stream sends CLOSE without EOF): then the whole stream is over.
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
        // Close both channels, so that neither peer waits for the other's CLOSE, and free the
        // stream's task and slots now: a direction still running is dropped (its bytes were
        // counted in the metric as they moved).
        let _ = a_tx.close().await;
        let _ = b_tx.close().await;
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

/// Moves one direction until its EOF or its channel's end; returns the bytes moved.
async fn pump(
    rx: russh::ChannelReadHalf,
    tx: &russh::ChannelWriteHalf<Msg>,
    direction: &'static str,
) -> (u64, End) {
    use postern_dial::splice::{Item, charge, eager_reader};
    let bytes = counter!(m::BYTES_PROXIED, "direction" => direction);
    let (reader, mut queue) = eager_reader(rx, SPLICE_QUEUE_CAP);
    let writer = async move {
        let mut total = 0u64;
        while let Some(item) = queue.next().await {
            match item {
                Item::Data(data) => {
                    let n = data.len();
                    if tx.data_bytes(data).await.is_err() {
                        return (total, End::Closed);
                    }
                    queue.release(charge(n, SPLICE_QUEUE_CAP));
                    total += n as u64;
                    bytes.increment(n as u64);
                }
                Item::Eof => {
                    let _ = tx.eof().await;
                    return (total, End::Eof);
                }
            }
        }
        (total, End::Closed)
    };
    tokio::pin!(reader);
    tokio::pin!(writer);
    let mut reader_done = false;
    loop {
        tokio::select! {
            done = &mut writer => break done,
            _ = &mut reader, if !reader_done => reader_done = true,
        }
    }
}
