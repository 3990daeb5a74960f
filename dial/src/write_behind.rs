//! A socket whose writes do not wait for the peer to read.
//!
//! russh's session loop writes each batch with `write_all().await` and reads nothing meanwhile.
//! Two russh peers pushing bulk data at each other (proxy ↔ agent, both directions busy) can
//! therefore both sit in `write_all` with both kernel buffers full, each waiting for the other to
//! read: a deadlock seen with 200 concurrent echo streams. [`WriteBehind`] hands writes to a
//! task of their own through a queue of at most `cap` bytes, so the session loop goes back to
//! reading while its output drains; only a peer that stops reading altogether for `cap` bytes
//! makes a write wait (bounded memory). A write that the kernel takes at once, with nothing
//! queued before it, is not copied at all.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::PollSemaphore;

/// Bytes a connection may have queued for its socket before writes wait.
pub const WRITE_BEHIND_CAP: usize = 256 << 20;

/// A TCP stream whose writes never wait for the peer to read (up to a bounded queue).
///
/// A write goes straight to the socket when nothing is queued and the kernel takes it: no copy,
/// the common case. Only what the kernel does not take at once is copied into the queue, which a
/// task of its own drains; later writes queue behind it, so bytes stay in order.
pub struct WriteBehind {
    read: OwnedReadHalf,
    /// Shared with the draining task; `None` once shut down.
    write: Option<Arc<OwnedWriteHalf>>,
    tx: Option<mpsc::UnboundedSender<Bytes>>,
    /// Bytes handed to the task and not yet written (direct writes only while it is 0).
    queued: Arc<AtomicUsize>,
    budget: PollSemaphore,
    /// Largest write taken at once (a quarter of the queue).
    chunk: usize,
    /// Permits acquired for the write in progress.
    held: usize,
}

impl WriteBehind {
    /// Wraps `stream`, spawning the task that writes its queue out.
    pub fn new(stream: TcpStream, cap: usize) -> WriteBehind {
        let (read, write) = stream.into_split();
        let write = Arc::new(write);
        let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
        let sem = Arc::new(Semaphore::new(cap));
        let queued = Arc::new(AtomicUsize::new(0));
        let (release, drained, w) = (sem.clone(), queued.clone(), write.clone());
        tokio::spawn(async move {
            while let Some(chunk) = rx.recv().await {
                let n = chunk.len();
                if write_out(&w, &chunk).await.is_err() {
                    // The socket is gone: fail later writes quickly by closing the queue.
                    rx.close();
                    release.close();
                    return;
                }
                drained.fetch_sub(n, Ordering::Release);
                release.add_permits(n);
            }
            // Shut the socket down once the owner let go of its handle too.
            if let Ok(mut w) = Arc::try_unwrap(w) {
                let _ = w.shutdown().await;
            }
        });
        WriteBehind {
            read,
            write: Some(write),
            tx: Some(tx),
            queued,
            budget: PollSemaphore::new(sem),
            chunk: (cap / 4).clamp(1, u32::MAX as usize),
            held: 0,
        }
    }
}

/// Writes all of `buf` through a shared write half.
async fn write_out(w: &OwnedWriteHalf, buf: &[u8]) -> io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        w.writable().await?;
        match w.try_write(&buf[off..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl AsyncRead for WriteBehind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

fn broken() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "connection closed")
}

impl AsyncWrite for WriteBehind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        let (Some(_), Some(write)) = (&this.tx, &this.write) else {
            return Poll::Ready(Err(broken()));
        };
        // Nothing queued: give the kernel what it takes now, without a copy.
        if this.queued.load(Ordering::Acquire) == 0 {
            match write.try_write(buf) {
                Ok(n) if n > 0 => return Poll::Ready(Ok(n)),
                Ok(_) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        // Take at most what the budget can ever hold, so a huge write cannot wait forever.
        let want = buf.len().min(this.chunk);
        while this.held < want {
            let need = (want - this.held) as u32;
            match ready!(this.budget.poll_acquire_many(cx, need)) {
                Some(p) => {
                    this.held += p.num_permits();
                    p.forget();
                }
                None => return Poll::Ready(Err(broken())),
            }
        }
        this.held -= want;
        let chunk = Bytes::copy_from_slice(&buf[..want]);
        this.queued.fetch_add(want, Ordering::Release);
        match this.tx.as_ref().map(|tx| tx.send(chunk)) {
            Some(Ok(())) => Poll::Ready(Ok(want)),
            _ => Poll::Ready(Err(broken())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Queued bytes count as flushed: waiting here would bring the deadlock back.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Let go of the write half, then of the queue: the task drains what is queued, and shuts
        // the socket down.
        self.write = None;
        self.tx = None;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn writes_do_not_wait_for_the_peer_and_arrive_in_order() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = l.accept().await.unwrap();
        let mut w = WriteBehind::new(client, 8 << 20);
        // 6 MiB with nobody reading: far past the kernel buffers, within the queue.
        let data: Vec<u8> = (0..6 << 20).map(|i| (i % 251) as u8).collect();
        tokio::time::timeout(std::time::Duration::from_secs(5), w.write_all(&data))
            .await
            .expect("writes complete while the peer is not reading")
            .unwrap();
        w.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, data);
    }

    #[tokio::test]
    async fn a_peer_that_never_reads_makes_writes_wait_past_the_cap() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (_server, _) = l.accept().await.unwrap();
        let mut w = WriteBehind::new(client, 1 << 20);
        let data = vec![1u8; 64 << 20];
        let r =
            tokio::time::timeout(std::time::Duration::from_millis(500), w.write_all(&data)).await;
        assert!(r.is_err(), "memory is bounded: the write waits");
    }
}
