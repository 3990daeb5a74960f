//! A client stream's bytes between its QUIC stream and the target's socket.

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::splice::{read_from_target, write_all_chunks};

/// Chunks taken from a QUIC stream per vectored write to the target.
const CHUNKS: usize = 32;

/// Splices a QUIC stream and a socket until both directions ended or either failed. `early` is
/// payload that came with the open frame.
pub(super) async fn splice(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    early: BytesMut,
    tcp: TcpStream,
) -> (u64, u64) {
    let (mut tcp_r, mut tcp_w) = tcp.into_split();
    // Each direction returns (bytes, ended cleanly).
    let to_target = async {
        let mut total = early.len() as u64;
        if !early.is_empty() && tcp_w.write_all(&early).await.is_err() {
            let _ = recv.stop(1u32.into());
            return (total, false);
        }
        // quinn hands over one chunk per datagram (about 1,200 bytes): whatever is ready goes to
        // the socket in one vectored write, without copying it together.
        let mut chunks: [Bytes; CHUNKS] = Default::default();
        loop {
            match recv.read_chunks(&mut chunks).await {
                Ok(Some(n)) => {
                    let got: u64 = chunks[..n].iter().map(|c| c.len() as u64).sum();
                    if write_all_chunks(&mut tcp_w, &mut chunks[..n])
                        .await
                        .is_err()
                    {
                        let _ = recv.stop(1u32.into());
                        return (total, false);
                    }
                    total += got;
                }
                Ok(None) => {
                    let _ = tcp_w.shutdown().await;
                    return (total, true);
                }
                Err(_) => return (total, false),
            }
        }
    };
    let from_target = async {
        let mut total = 0u64;
        // Held only while the service has more to read: an idle stream holds no buffer.
        let mut buf = BytesMut::new();
        loop {
            match read_from_target(&mut tcp_r, &mut buf).await {
                Ok(None) => {
                    let _ = send.finish();
                    return (total, true);
                }
                Ok(Some(chunk)) => {
                    total += chunk.len() as u64;
                    if send.write_chunk(chunk).await.is_err() {
                        return (total, false);
                    }
                }
                Err(_) => {
                    let _ = send.reset(1u32.into());
                    return (total, false);
                }
            }
        }
    };
    tokio::pin!(to_target, from_target);
    let (mut up, mut down) = (None, None);
    loop {
        tokio::select! {
            r = &mut to_target, if up.is_none() => up = Some(r),
            r = &mut from_target, if down.is_none() => down = Some(r),
        }
        let failed = matches!(up, Some((_, false))) || matches!(down, Some((_, false)));
        if failed || (up.is_some() && down.is_some()) {
            break;
        }
    }
    (up.map_or(0, |r| r.0), down.map_or(0, |r| r.0))
}
