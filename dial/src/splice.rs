//! Draining an SSH channel without stalling its connection, and per-stream credit.
//!
//! russh 0.65 grants channel window as soon as its session loop *receives* data, and applies
//! back-pressure only by blocking that loop when a channel's message queue is full. A blocked loop
//! also stops reading window adjustments for every other channel of the connection, so one slow
//! consumer would stall every stream of its tunnel (head-of-line blocking), and a splice that
//! simply awaits the peer's window can deadlock.
//!
//! Two pieces fix that without changing russh:
//! - [`eager_reader`] takes every message off a channel at once and parks it in a [`Queue`]
//!   holding at most `cap` bytes;
//! - between proxy and agent (both Postern), each stream carries its own credit
//!   ([`tunnel_proto::credit`]): the sender spends [`Credit`] before each write, and the receiver
//!   grants it back as its consumer drains ([`Queue::release`] says when). The peer then never
//!   has more than the window outstanding, the queue never fills, and the session loop never
//!   blocks: a stalled consumer stalls only its own stream, for as long as it likes, and resumes
//!   with every byte.
//!
//! A peer without credit (an OpenSSH client, an older agent) still gets the old back-pressure:
//! past `cap` the reader stops reading, which blocks that peer's own connection only.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::channel::mpsc;
use futures::stream::Stream;
use russh::{ChannelMsg, ChannelReadHalf};
use tokio::sync::Semaphore;
use tunnel_proto::credit::{CREDIT_EXT, GRANT_EVERY, decode_grant};

/// What a channel delivered.
#[derive(Debug)]
pub enum Item {
    /// Payload.
    Data(Bytes),
    /// The peer will send no more data.
    Eof,
}

/// Credit to send on one stream: bytes the peer has room for. Cloned handles share it.
#[derive(Clone, Debug)]
pub struct Credit {
    permits: Arc<Semaphore>,
    /// The most a peer may grant beyond the window (a peer that over-grants only hurts itself,
    /// but the count must stay bounded).
    ceiling: usize,
}

impl Credit {
    /// Credit for a stream whose peer starts with room for `window` bytes.
    pub fn new(window: usize) -> Credit {
        Credit {
            permits: Arc::new(Semaphore::new(window)),
            ceiling: window.saturating_mul(4),
        }
    }

    /// Waits until `n` bytes may be sent, and spends them. `n` must not exceed the window.
    pub async fn spend(&self, n: usize) {
        if n == 0 {
            return;
        }
        // The semaphore is never closed.
        if let Ok(p) = self.permits.acquire_many(n as u32).await {
            p.forget();
        }
    }

    /// The peer granted `n` more bytes.
    pub fn grant(&self, n: u32) {
        let room = self
            .ceiling
            .saturating_sub(self.permits.available_permits());
        self.permits.add_permits((n as usize).min(room));
    }

    /// Bytes that may be sent now without waiting.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }
}

/// The consuming end of an eagerly read channel.
pub struct Queue {
    /// futures' unbounded channel, not tokio's: tokio allocates a block of 32 slots per channel
    /// up front (about 1.3 KiB with its header), futures one node per message in flight; every
    /// stream holds one or two of these for its whole life, idle or not.
    rx: mpsc::UnboundedReceiver<Item>,
    budget: Arc<Semaphore>,
    cap: usize,
    /// Whether the peer sends under credit we grant (then [`Queue::release`] says when to grant).
    granting: bool,
    /// Bytes passed on since the last grant.
    owed: u32,
}

impl Queue {
    /// The next item; `None` once the channel closed.
    pub async fn next(&mut self) -> Option<Item> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// [`Queue::next`] for a poll-based reader.
    pub fn poll_next(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Item>> {
        std::pin::Pin::new(&mut self.rx).poll_next(cx)
    }

    /// Gives back the budget of an item of `len` bytes once its data has been written on. With
    /// credit, returns the grant to send the peer now (see [`grant_bytes`]), if one is due.
    #[must_use = "a grant that is not sent stalls the peer"]
    pub fn release(&mut self, len: usize) -> Option<u32> {
        self.budget.add_permits(len.min(self.cap));
        if !self.granting {
            return None;
        }
        self.owed = self.owed.saturating_add(len as u32);
        if self.owed >= GRANT_EVERY {
            Some(std::mem::take(&mut self.owed))
        } else {
            None
        }
    }
}

/// The extended-data payload of a grant.
pub fn grant_bytes(n: u32) -> Bytes {
    Bytes::copy_from_slice(&tunnel_proto::credit::encode_grant(n))
}

/// Reads `rx` eagerly into a [`Queue`] bounded at `cap` bytes. Run the returned future (it ends
/// when the channel closes or the queue is dropped) alongside the consumer.
///
/// `flow` turns credit on for this channel: grants the peer sends on it are added to that
/// [`Credit`] (ours to send on this channel), and [`Queue::release`] says when to grant the peer
/// credit back as the consumer drains (the peer sends under our credit).
pub fn eager_reader(
    mut rx: ChannelReadHalf,
    cap: usize,
    flow: Option<Credit>,
) -> (impl Future<Output = ()> + Send, Queue) {
    let (tx, qrx) = mpsc::unbounded();
    let budget = Arc::new(Semaphore::new(cap));
    let b = budget.clone();
    let granting = flow.is_some();
    let reader = async move {
        while let Some(msg) = rx.wait().await {
            let item = match msg {
                ChannelMsg::Data { data } => {
                    // Under credit the peer never has more than the window outstanding, so this
                    // never waits. A peer without credit (or one that ignores it) waits here,
                    // which blocks its own connection's session loop: back-pressure as SSH gives.
                    let n = data.len().min(cap) as u32;
                    match b.acquire_many(n).await {
                        Ok(p) => p.forget(),
                        Err(_) => return,
                    }
                    Item::Data(data)
                }
                ChannelMsg::ExtendedData { data, ext } if ext == CREDIT_EXT => {
                    match (&flow, decode_grant(&data)) {
                        (Some(credit), Some(n)) => credit.grant(n),
                        _ => tracing::debug!(len = data.len(), "ignored a malformed credit grant"),
                    }
                    continue;
                }
                ChannelMsg::Eof => Item::Eof,
                ChannelMsg::Close => break,
                _ => continue,
            };
            if tx.unbounded_send(item).is_err() {
                return;
            }
        }
    };
    (
        reader,
        Queue {
            rx: qrx,
            budget,
            cap,
            granting,
            owed: 0,
        },
    )
}

/// How long a stream waits for the peer's control hello to learn whether it speaks credit. Both
/// ends send their hello first thing on `@control`, so this only runs out when the control
/// channel is broken; both ends then run the stream without credit.
pub const HELLO_WAIT: Duration = Duration::from_secs(5);

/// The peer's protocol version once its hello arrived, or 1 (no credit) after [`HELLO_WAIT`].
pub async fn peer_version(mut version: tokio::sync::watch::Receiver<u32>) -> u32 {
    match tokio::time::timeout(HELLO_WAIT, version.wait_for(|v| *v != 0)).await {
        Ok(Ok(v)) => *v,
        _ => 1,
    }
}

/// An [`AsyncWrite`](tokio::io::AsyncWrite) that spends a stream's [`Credit`] before each write
/// to `inner` (a channel's writer): it waits, without blocking anything else, until the peer
/// granted room.
pub struct CreditWriter<W> {
    inner: W,
    permits: tokio_util::sync::PollSemaphore,
    /// Bytes already spent and not yet taken by `inner` (it may take less than offered).
    prepaid: usize,
    /// The most offered to `inner` at once.
    max: usize,
}

impl<W> CreditWriter<W> {
    /// Writes to `inner` under `credit`, at most `max` bytes per write. Keep `max` well under
    /// the window: a write waits until all of it was granted, and grants come in quarter windows
    /// ([`GRANT_EVERY`]), so `max` above three quarters of the window could wait forever.
    pub fn new(inner: W, credit: &Credit, max: usize) -> CreditWriter<W> {
        CreditWriter {
            inner,
            permits: tokio_util::sync::PollSemaphore::new(credit.permits.clone()),
            prepaid: 0,
            max: max.max(1),
        }
    }
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for CreditWriter<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.prepaid == 0 {
            let want = buf.len().min(self.max) as u32;
            // The semaphore is never closed.
            if let Some(p) = std::task::ready!(self.permits.poll_acquire_many(cx, want)) {
                p.forget();
            }
            self.prepaid = want as usize;
        }
        let n = buf.len().min(self.prepaid);
        let wrote =
            std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_write(cx, &buf[..n]))?;
        self.prepaid -= wrote;
        Poll::Ready(Ok(wrote))
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Sends a credit grant of `n` bytes on `tx`. Failure is ignored: a channel that cannot take a
/// grant is closing.
///
/// This and [`send_data`] box russh's send futures (about a kilobyte each, for the message they
/// carry): inline, every stream's task would hold that much for its whole life, idle or not.
pub async fn send_grant<S: From<(russh::ChannelId, ChannelMsg)> + Send + Sync + 'static>(
    tx: &russh::ChannelWriteHalf<S>,
    n: u32,
) {
    let _ =
        Box::pin(tx.extended_data_bytes(tunnel_proto::credit::CREDIT_EXT, grant_bytes(n))).await;
}

/// Sends `data` on `tx`, spending `credit` first when the stream has it. Data is sent in pieces
/// of at most a quarter window: the peer grants in quarter windows ([`GRANT_EVERY`]) and may owe
/// up to one, so a larger piece could wait for credit that never comes.
pub async fn send_data<S: From<(russh::ChannelId, ChannelMsg)> + Send + Sync + 'static>(
    tx: &russh::ChannelWriteHalf<S>,
    mut data: Bytes,
    credit: Option<&Credit>,
    window: usize,
) -> Result<(), russh::Error> {
    let Some(credit) = credit else {
        return Box::pin(tx.data_bytes(data)).await;
    };
    while !data.is_empty() {
        let chunk = data.split_to(data.len().min((window / 4).max(1)));
        credit.spend(chunk.len()).await;
        Box::pin(tx.data_bytes(chunk)).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn credit_is_spent_and_granted_within_a_ceiling() {
        let c = Credit::new(100);
        c.spend(60).await;
        assert_eq!(c.available(), 40);
        c.grant(60);
        assert_eq!(c.available(), 100);
        // Over-granting is capped at four windows.
        c.grant(u32::MAX);
        assert_eq!(c.available(), 400);
        let blocked = tokio::time::timeout(std::time::Duration::from_millis(50), async {
            c.spend(400).await;
            c.spend(1).await;
        })
        .await;
        assert!(blocked.is_err(), "spending past the credit waits");
    }
}
