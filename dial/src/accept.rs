//! Accepting connections on a server listener (the proxy's web and tunnel listeners, the Auth
//! API), with limits that hold before any work is done for a connection:
//!
//! - a cap on connections open at once, and one per source address: a connection over either is
//!   closed at once and reported to the caller as a [`Refused`] with its [`Refusal`];
//! - back-off on accept errors (10 ms doubling to 1 s), logged at most once per 10 s, instead of
//!   a busy loop;
//! - a descriptor reserve: each [`Acceptor`] holds one spare descriptor. When accept fails
//!   because the process is out of descriptors (`EMFILE`/`ENFILE`), the spare is released, the
//!   waiting connection is accepted and closed at once (so the client is told instead of waiting
//!   in the backlog), and the spare is taken again.
//!
//! The caps are what keeps one listener from starving another: set each listener's
//! `max_connections` so that together they stay under the process's descriptor limit
//! ([`nofile_limit`]).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tracing::warn;

/// Connection caps of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptLimits {
    /// Connections open at once, at most.
    pub max_connections: usize,
    /// Connections open at once from one source address, at most.
    pub max_per_source: usize,
}

/// Why a connection was closed at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The listener holds `max_connections` already.
    #[error("too many connections (limit {0})")]
    MaxConnections(usize),
    /// The source address holds `max_per_source` already.
    #[error("too many connections from this address (limit {0})")]
    MaxPerSource(usize),
    /// The process is out of descriptors; the connection was shed using the reserve.
    #[error("out of file descriptors")]
    NoDescriptors,
}

impl Refusal {
    /// A metric label: `max_connections`, `max_connections_per_source` or `no_descriptors`.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::MaxConnections(_) => "max_connections",
            Refusal::MaxPerSource(_) => "max_connections_per_source",
            Refusal::NoDescriptors => "no_descriptors",
        }
    }
}

/// A connection closed at accept, and why.
#[derive(Debug)]
pub struct Refused {
    /// Who it came from (unspecified when the accept itself failed).
    pub peer: SocketAddr,
    /// Why.
    pub reason: Refusal,
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// A connection's place under the caps; dropping it frees the place.
pub struct Slot {
    counts: Arc<Mutex<Counts>>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_source.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.by_source.remove(&self.ip);
            }
        }
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").field("ip", &self.ip).finish()
    }
}

/// An accepted connection with its slot (hold the slot as long as the connection).
#[derive(Debug)]
pub struct Accepted {
    /// The socket (`TCP_NODELAY` set).
    pub stream: TcpStream,
    /// Its peer.
    pub peer: SocketAddr,
    /// Its place under the caps.
    pub slot: Slot,
}

/// A listener with caps, back-off and a descriptor reserve (see the module docs).
pub struct Acceptor {
    listener: TcpListener,
    name: &'static str,
    limits: AcceptLimits,
    exempt: Vec<IpAddr>,
    counts: Arc<Mutex<Counts>>,
    reserve: Option<std::fs::File>,
    backoff: Duration,
    warned: Option<Instant>,
}

const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

fn spare() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

impl Acceptor {
    /// Wraps `listener`; `name` appears in log lines.
    pub fn new(listener: TcpListener, name: &'static str, limits: AcceptLimits) -> Acceptor {
        Acceptor {
            listener,
            name,
            limits,
            exempt: Vec::new(),
            counts: Arc::default(),
            reserve: spare(),
            backoff: MIN_BACKOFF,
            warned: None,
        }
    }

    /// Addresses the per-source cap does not apply to (they still count in the total): for a
    /// listener whose many clients share one address, such as the Auth API behind its embedded
    /// agent, which dials from loopback.
    pub fn exempt_from_per_source(mut self, addrs: Vec<IpAddr>) -> Acceptor {
        self.exempt = addrs;
        self
    }

    /// Connections holding a slot now.
    pub fn open(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).total
    }

    fn admit(&self, ip: IpAddr) -> Result<Slot, Refusal> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if c.total >= self.limits.max_connections {
            return Err(Refusal::MaxConnections(self.limits.max_connections));
        }
        let exempt = self.exempt.contains(&ip);
        let n = c.by_source.entry(ip).or_insert(0);
        if *n >= self.limits.max_per_source && !exempt {
            return Err(Refusal::MaxPerSource(self.limits.max_per_source));
        }
        *n += 1;
        c.total += 1;
        Ok(Slot {
            counts: self.counts.clone(),
            ip,
        })
    }

    fn warn_now(&mut self) -> bool {
        let due = self
            .warned
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
        if due {
            self.warned = Some(Instant::now());
        }
        due
    }

    /// The next connection under the caps, or the next refusal. Cancel-safe.
    pub async fn accept(&mut self) -> Result<Accepted, Refused> {
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    self.backoff = MIN_BACKOFF;
                    return match self.admit(peer.ip()) {
                        Ok(slot) => {
                            let _ = stream.set_nodelay(true);
                            Ok(Accepted { stream, peer, slot })
                        }
                        Err(reason) => Err(Refused { peer, reason }),
                    };
                }
                Err(e) => {
                    let out_of_fds = matches!(e.raw_os_error(), Some(23 | 24));
                    if self.warn_now() {
                        warn!(listener = self.name, error = %e, open = self.open(), backoff_ms = self.backoff.as_millis() as u64,
                            "accept failed: backing off (logged once per 10 s)");
                    }
                    let mut shed = None;
                    if out_of_fds && self.reserve.take().is_some() {
                        if let Ok(Ok((s, peer))) =
                            tokio::time::timeout(Duration::from_millis(5), self.listener.accept())
                                .await
                        {
                            drop(s);
                            shed = Some(peer);
                        }
                        self.reserve = spare();
                    }
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                    if let Some(peer) = shed {
                        return Err(Refused {
                            peer,
                            reason: Refusal::NoDescriptors,
                        });
                    }
                }
            }
        }
    }
}

/// A stream whose reads fail (`TimedOut`) once the peer has been silent too long: for
/// `first_bytes` after [`Watched::arm`] (called when a TLS handshake, which has its own deadline,
/// is done), then for `idle` after each read that brought bytes. Writes do not count: only the
/// peer sending something keeps the connection. `on_cut` is told the reason
/// (`first_bytes_timeout` or `idle_timeout`), for a metric.
pub struct Watched<S> {
    inner: S,
    timer: Option<Pin<Box<Sleep>>>,
    awaiting_first: bool,
    first_bytes: Duration,
    idle: Duration,
    on_cut: fn(&'static str),
}

impl<S> Watched<S> {
    /// Wraps `inner`; no deadline runs until [`Watched::arm`].
    pub fn new(inner: S, first_bytes: Duration, idle: Duration, on_cut: fn(&'static str)) -> Self {
        Watched {
            inner,
            timer: None,
            awaiting_first: true,
            first_bytes,
            idle,
            on_cut,
        }
    }

    /// Starts the clocks: the peer's first bytes are due within `first_bytes`.
    pub fn arm(&mut self) {
        self.awaiting_first = true;
        self.timer = Some(Box::pin(tokio::time::sleep(self.first_bytes)));
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                self.awaiting_first = false;
                let idle = self.idle;
                if let Some(t) = self.timer.as_mut() {
                    t.as_mut().reset(tokio::time::Instant::now() + idle);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let first = self.awaiting_first;
                match self.timer.as_mut().map(|t| t.as_mut().poll(cx)) {
                    Some(Poll::Ready(())) => {
                        let reason = if first {
                            "first_bytes_timeout"
                        } else {
                            "idle_timeout"
                        };
                        (self.on_cut)(reason);
                        Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            reason,
                        )))
                    }
                    _ => Poll::Pending,
                }
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The process's soft limit on open descriptors (`/proc/self/limits`), if it can be read.
pub fn nofile_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn caps_refuse_with_a_reason_and_slots_free_on_drop() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut a = Acceptor::new(
            l,
            "test",
            AcceptLimits {
                max_connections: 3,
                max_per_source: 2,
            },
        );
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        let first = a.accept().await.unwrap();
        let _second = a.accept().await.unwrap();
        let third = a.accept().await.unwrap_err();
        assert_eq!(third.reason, Refusal::MaxPerSource(2));
        assert_eq!(a.open(), 2);
        drop(first);
        assert_eq!(a.open(), 1);
        clients.push(TcpStream::connect(addr).await.unwrap());
        assert!(a.accept().await.is_ok(), "a freed slot is reusable");
        assert!(nofile_limit().is_some());

        // An exempt address is held only by the total.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut a = Acceptor::new(
            l,
            "test",
            AcceptLimits {
                max_connections: 3,
                max_per_source: 1,
            },
        )
        .exempt_from_per_source(vec!["127.0.0.1".parse().unwrap()]);
        let mut held = Vec::new();
        for _ in 0..4 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        for _ in 0..3 {
            held.push(a.accept().await.unwrap());
        }
        assert_eq!(
            a.accept().await.unwrap_err().reason,
            Refusal::MaxConnections(3)
        );
    }
}
