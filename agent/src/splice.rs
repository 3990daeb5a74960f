//! A stream's bytes between the tunnel and its target's socket: [`splice_tcp`] for an SSH
//! channel (the QUIC stream's twin is `quic::splice`), and the socket reads and writes both use.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use russh::Channel;
use russh::client::Msg;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tunnel_proto::credit::STREAM_WINDOW;

use crate::tunnel::{LEGACY_QUEUE, SPLICE_BUF};

/// Reads below this size are copied out of the splice buffer rather than handed on in it.
const SMALL_READ: usize = 4096;

/// The next bytes from the target (`None` at its EOF), read into `buf`: a large read is frozen and
/// handed on without a copy, one under [`SMALL_READ`] is copied out, so that it does not pin the
/// whole buffer while it waits for credit. `buf` is dropped whenever the socket is drained, and
/// made again once it is readable: an idle stream holds no splice buffer.
pub(crate) async fn read_from_target(
    r: &mut OwnedReadHalf,
    buf: &mut BytesMut,
) -> std::io::Result<Option<Bytes>> {
    loop {
        if buf.capacity() < SPLICE_BUF / 4 {
            r.readable().await?;
            *buf = BytesMut::with_capacity(SPLICE_BUF);
        }
        match r.try_read_buf(buf) {
            Ok(0) => return Ok(None),
            Ok(n) if n < SMALL_READ => {
                let c = Bytes::copy_from_slice(buf);
                buf.clear();
                return Ok(Some(c));
            }
            Ok(_) => return Ok(Some(buf.split().freeze())),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => *buf = BytesMut::new(),
            Err(e) => return Err(e),
        }
    }
}

/// Writes every byte of `chunks` to `w`, in vectored writes (no copy), emptying them.
pub(crate) async fn write_all_chunks(
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    chunks: &mut [Bytes],
) -> std::io::Result<()> {
    use bytes::Buf;
    let mut first = 0;
    while first < chunks.len() {
        if chunks[first].is_empty() {
            first += 1;
            continue;
        }
        let slices: Vec<std::io::IoSlice<'_>> = chunks[first..]
            .iter()
            .map(|c| std::io::IoSlice::new(c))
            .collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let c = &mut chunks[first];
            let k = n.min(c.len());
            c.advance(k);
            n -= k;
            if c.is_empty() {
                first += 1;
            }
        }
    }
    Ok(())
}

/// Splices a channel and a socket until the stream is over, then drops the socket at once.
///
/// The channel is read eagerly into a bounded queue (see `postern_dial::splice`); the socket is
/// read into a 64 KiB buffer whose filled part is frozen and handed to russh without a copy
/// (reads under 4 KiB are copied out instead), held only while the socket has data: an idle
/// stream holds no buffer.
///
/// The stream is over when both directions ended cleanly (EOF each way), when either socket
/// direction fails (the service reset or vanished), or when the proxy closed the channel. The task
/// never waits for the proxy's answering CLOSE: russh 0.65 drops a CLOSE that answers one we sent
/// (the channel is already gone from its table), so a read half awaited after our own close would
/// never end, and would hold the socket's descriptor for the tunnel's lifetime (the leak the
/// hardening issue measured: one descriptor per stream that ended normally).
pub(crate) async fn splice_tcp(channel: Channel<Msg>, tcp: TcpStream, credit: bool) -> (u64, u64) {
    use postern_dial::splice::{Credit, Item, eager_reader, send_data, send_grant};
    use tokio::io::AsyncWriteExt;
    let (rx, tx) = channel.split();
    let (mut tcp_r, mut tcp_w) = tcp.into_split();
    let window = STREAM_WINDOW as usize;
    let send_credit = credit.then(|| Credit::new(window));
    let cap = if credit { window } else { LEGACY_QUEUE };
    let (reader, mut queue) = eager_reader(rx, cap, send_credit.clone());
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    // Each direction returns whether it ended cleanly (EOF) rather than by an error.
    let to_target = async {
        while let Some(item) = queue.next().await {
            match item {
                Item::Data(data) => {
                    if tcp_w.write_all(&data).await.is_err() {
                        return false;
                    }
                    if let Some(g) = queue.release(data.len()) {
                        send_grant(&tx, g).await;
                    }
                    up.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                // No data follows an EOF.
                Item::Eof => {
                    let _ = tcp_w.shutdown().await;
                    return true;
                }
            }
        }
        // The channel closed without EOF: the proxy ended the stream.
        false
    };
    let from_target = async {
        // Held only while the service has more to read: an idle stream holds no buffer.
        let mut buf = BytesMut::new();
        loop {
            match read_from_target(&mut tcp_r, &mut buf).await {
                Ok(None) => {
                    let _ = Box::pin(tx.eof()).await;
                    return true;
                }
                Err(_) => return false,
                Ok(Some(chunk)) => {
                    down.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    if send_data(&tx, chunk, send_credit.as_ref(), window)
                        .await
                        .is_err()
                    {
                        return false;
                    }
                }
            }
        }
    };
    tokio::pin!(reader, to_target, from_target);
    let (mut up_done, mut down_done, mut reader_done) = (false, false, false);
    loop {
        tokio::select! {
            clean = &mut to_target, if !up_done => {
                up_done = true;
                if !clean { break; }
            }
            clean = &mut from_target, if !down_done => {
                down_done = true;
                if !clean { break; }
            }
            // The reader ends when the channel closed (or failed): nothing more will arrive, and
            // the queue's end tells `to_target` so.
            _ = &mut reader, if !reader_done => reader_done = true,
        }
        // Once the proxy closed the channel and its last data reached the service, the service's
        // answer has nowhere to go.
        if up_done && (down_done || reader_done) {
            break;
        }
    }
    // Close the channel (the proxy relays it to the client) and let every half go now: the
    // socket's descriptor is freed when this function returns.
    let _ = Box::pin(tx.close()).await;
    (up.load(Ordering::Relaxed), down.load(Ordering::Relaxed))
}
