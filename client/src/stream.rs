//! [`TunnelStream`]: one stream to a target, multiplexed over the session with the proxy: an SSH
//! channel, or a QUIC stream ([`crate::Transport::Quic`], flow-controlled by QUIC itself).
//!
//! On SSH:
//! russh re-opens an SSH channel's window as soon as its session loop receives data, and holds a
//! reader back only by blocking that loop, which also stops every other stream of the session
//! (and the window adjustments this stream's own writes wait for). With a proxy that speaks
//! per-stream credit ([`tunnel_proto::credit`]), the stream is flow-controlled on its own, both
//! ways: what arrives is taken off the channel at once into a queue the proxy can never overfill
//! (it sends only what this end granted, granted back as the application reads), and writes
//! spend the proxy's grants first. An application that stops reading one stream then stalls that
//! stream only, for as long as it likes, and it resumes with every byte.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use postern_dial::splice::{Credit, CreditWriter, Item, Queue, eager_reader, send_grant};
use russh::client::{Handle, Msg};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tunnel_proto::credit::STREAM_WINDOW;

use crate::ClientHandler;

/// The most one write spends and sends at once: one SSH packet's payload. Spending more would
/// wait for the whole amount to be granted back, and the proxy grants in quarter windows.
const WRITE_CHUNK: usize = 32 << 10;

/// A byte stream to a target, multiplexed over the session with the proxy (SSH or QUIC). Keeps
/// the session alive while it exists; dropping it closes the stream.
///
/// Reads end with `Ok(0)` only when the far side sent EOF. A stream cut short (the agent or the
/// service died, the proxy shut down, the session broke) ends with an
/// [`std::io::ErrorKind::ConnectionAborted`] error instead, never silently.
pub struct TunnelStream(Inner);

enum Inner {
    Ssh(Box<SshStream>),
    Quic(QuicStream),
}

/// A stream on an SSH session: a channel under per-stream credit when the proxy speaks it.
struct SshStream {
    queue: Queue,
    pending: bytes::Bytes,
    /// The far side sent EOF.
    ended: bool,
    failed: Option<(std::io::ErrorKind, String)>,
    writer: Pin<Box<dyn AsyncWrite + Send + Sync>>,
    tx: Arc<russh::ChannelWriteHalf<Msg>>,
    reader: tokio::task::JoinHandle<()>,
    _session: Arc<Handle<ClientHandler>>,
}

/// A stream on a QUIC session: its halves, and payload that came with the proxy's accept.
struct QuicStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    early: bytes::Bytes,
    /// The session's UDP socket, kept open while the stream is.
    _endpoint: quinn::Endpoint,
}

/// The error of a stream cut before its end.
fn aborted(why: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        format!("stream cut before its end: {why}"),
    )
}

impl TunnelStream {
    /// Wraps an open QUIC stream (`early`: payload read with the proxy's accept).
    pub(crate) fn quic(
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        early: bytes::Bytes,
        endpoint: quinn::Endpoint,
    ) -> TunnelStream {
        TunnelStream(Inner::Quic(QuicStream {
            send,
            recv,
            early,
            _endpoint: endpoint,
        }))
    }

    /// Wraps an open channel; `credit` when the proxy speaks per-stream credit.
    pub(crate) fn new(
        ch: russh::Channel<Msg>,
        session: Arc<Handle<ClientHandler>>,
        credit: bool,
    ) -> TunnelStream {
        let (rd, wr) = ch.split();
        let window = STREAM_WINDOW as usize;
        // Our credit to send: the proxy's grants arrive on this channel. Without credit the
        // queue's bound blocks the session past one window (SSH's own back-pressure).
        let to_proxy = credit.then(|| Credit::new(window));
        let (reader, queue) = eager_reader(rd, window, to_proxy.clone());
        let writer: Pin<Box<dyn AsyncWrite + Send + Sync>> = match &to_proxy {
            Some(c) => Box::pin(CreditWriter::new(wr.make_writer(), c, WRITE_CHUNK)),
            None => Box::pin(wr.make_writer()),
        };
        TunnelStream(Inner::Ssh(Box::new(SshStream {
            queue,
            pending: bytes::Bytes::new(),
            ended: false,
            failed: None,
            writer,
            tx: Arc::new(wr),
            reader: tokio::spawn(reader),
            _session: session,
        })))
    }
}

impl Drop for SshStream {
    fn drop(&mut self) {
        self.reader.abort();
        let tx = self.tx.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = tx.close().await;
            });
        }
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().0 {
            Inner::Ssh(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Inner::Quic(q) => {
                if !q.early.is_empty() {
                    let n = buf.remaining().min(q.early.len());
                    buf.put_slice(&q.early.split_to(n));
                    return Poll::Ready(Ok(()));
                }
                // quinn reports a reset or a lost connection as an error: the stream was cut.
                Pin::new(&mut q.recv)
                    .poll_read(cx, buf)
                    .map_err(|e| aborted(format!("{e} (the agent, the service or the proxy went away, or the QUIC session with the proxy ended)")))
            }
        }
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().0 {
            Inner::Ssh(s) => s.writer.as_mut().poll_write(cx, buf),
            Inner::Quic(q) => Pin::new(&mut q.send).poll_write(cx, buf).map_err(aborted),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().0 {
            Inner::Ssh(s) => s.writer.as_mut().poll_flush(cx),
            Inner::Quic(q) => Pin::new(&mut q.send).poll_flush(cx).map_err(aborted),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().0 {
            Inner::Ssh(s) => s.writer.as_mut().poll_shutdown(cx),
            Inner::Quic(q) => Pin::new(&mut q.send).poll_shutdown(cx).map_err(aborted),
        }
    }
}

impl AsyncRead for SshStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some((kind, msg)) = &self.failed {
            return Poll::Ready(Err(std::io::Error::new(*kind, msg.clone())));
        }
        while self.pending.is_empty() {
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            match std::task::ready!(self.queue.poll_next(cx)) {
                Some(Item::Data(data)) => self.pending = data,
                Some(Item::Eof) => self.ended = true,
                None => {
                    let e = std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "stream cut before its end: the agent, the service or the proxy went away, or the SSH session with the proxy ended",
                    );
                    self.failed = Some((e.kind(), e.to_string()));
                    return Poll::Ready(Err(e));
                }
            }
        }
        let n = buf.remaining().min(self.pending.len());
        let chunk = self.pending.split_to(n);
        buf.put_slice(&chunk);
        // Read by the application: grant the proxy that much again (every quarter window).
        if let Some(g) = self.queue.release(n) {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                send_grant(&tx, g).await;
            });
        }
        Poll::Ready(Ok(()))
    }
}
