//! Draining an SSH channel without stalling its connection.
//!
//! russh 0.65 grants channel window as soon as its session loop *receives* data, and applies
//! back-pressure only by blocking that loop when a channel's message queue is full. A blocked loop
//! also stops reading window adjustments for every other channel of the connection — including
//! the reverse direction of the same stream — so a splice that simply awaits the peer's window
//! can deadlock: proxy → agent → echo service → agent → proxy is such a cycle. [`EagerReader`]
//! breaks it: it takes every message off the channel at once and parks it in a queue holding at
//! most `cap` bytes; only past that does it stop reading (bounded memory, back-pressure on the
//! connection as before).
//!
//! russh cannot hold back window for one stream, so a queue that stays full blocks its whole SSH
//! connection; in a cycle (a service that echoes while it reads) two full queues wait on each
//! other forever. A queue that stays full for [`STALL_TIMEOUT`] therefore gives up: the reader
//! drops the channel, the connection moves again, and that one stream ends with a close (no EOF)
//! instead of wedging every stream of its tunnel. A consumer that makes any progress keeps its
//! stream.

use std::sync::Arc;

use std::time::Duration;

use bytes::Bytes;
use russh::{ChannelMsg, ChannelReadHalf};
use tokio::sync::{Semaphore, mpsc};

/// How long a full queue may make no progress before its stream is given up.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What a channel delivered.
#[derive(Debug)]
pub enum Item {
    /// Payload.
    Data(Bytes),
    /// The peer will send no more data.
    Eof,
}

/// The consuming end of an eagerly read channel.
pub struct Queue {
    rx: mpsc::UnboundedReceiver<Item>,
    budget: Arc<Semaphore>,
}

impl Queue {
    /// The next item; `None` once the channel closed.
    pub async fn next(&mut self) -> Option<Item> {
        self.rx.recv().await
    }

    /// Gives `n` bytes of budget back once an item's data has been written on.
    pub fn release(&self, n: usize) {
        self.budget.add_permits(n);
    }
}

/// Reads `rx` eagerly into a [`Queue`] bounded at `cap` bytes. Run the returned future (it ends
/// when the channel closes or the queue is dropped) alongside the consumer.
pub fn eager_reader(
    mut rx: ChannelReadHalf,
    cap: usize,
) -> (impl Future<Output = ()> + Send, Queue) {
    let (tx, qrx) = mpsc::unbounded_channel();
    let budget = Arc::new(Semaphore::new(cap));
    let b = budget.clone();
    let reader = async move {
        while let Some(msg) = rx.wait().await {
            let item = match msg {
                ChannelMsg::Data { data } => {
                    let n = data.len().min(cap) as u32;
                    match tokio::time::timeout(STALL_TIMEOUT, b.acquire_many(n)).await {
                        Ok(Ok(p)) => p.forget(),
                        Ok(Err(_)) => return,
                        Err(_) => {
                            tracing::warn!(
                                queued = cap,
                                stall_s = STALL_TIMEOUT.as_secs(),
                                "stream stalled: its consumer made no progress; closing it so the connection moves again"
                            );
                            return;
                        }
                    }
                    Item::Data(data)
                }
                ChannelMsg::Eof => Item::Eof,
                ChannelMsg::Close => break,
                _ => continue,
            };
            if tx.send(item).is_err() {
                return;
            }
        }
    };
    (reader, Queue { rx: qrx, budget })
}

/// Budget released for an item of `len` bytes (matches what the reader took).
pub fn charge(len: usize, cap: usize) -> usize {
    len.min(cap)
}
