//! The services behind the tunnels: a sink that counts what it gets, an echo, and a hose that
//! writes as fast as it is let.
//!
//! The sink and the echo run in a process of their own ([`serve_until_stdin_closes`], the hidden
//! `--services` mode), so that the driver's descriptors go to client sockets only. The hose runs
//! in the driver: it feeds the few streams of the isolation and stalled-stream figures, and the
//! driver reads its byte counter.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Reads to EOF, then answers the byte count (8 bytes, big-endian).
pub async fn sink() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let a = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k as u64,
                    }
                }
                let _ = s.write_all(&n.to_be_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(a)
}

/// Writes back whatever it reads.
pub async fn echo() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let a = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(a)
}

/// A service that writes up to a given number of MiB of zeros to every connection, as fast as
/// it is let. The load tool's slow-consumer and isolation modes use it too.
pub struct Hose {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Bytes written so far over all connections (accepted by the kernel, not necessarily read).
    pub written: Arc<AtomicU64>,
}

impl Hose {
    /// Binds on loopback and serves `mib` MiB per connection until the runtime ends.
    pub async fn start(mib: u64) -> anyhow::Result<Hose> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let written = Arc::new(AtomicU64::new(0));
        let counter = written.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let chunk = vec![0u8; 64 << 10];
                    for _ in 0..mib * 16 {
                        if s.write_all(&chunk).await.is_err() {
                            return;
                        }
                        counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    }
                });
            }
        });
        Ok(Hose { addr, written })
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

/// The `--services` mode: serves the sink and the echo, prints their addresses on one line, and
/// runs until the parent goes away (its end of stdin closes).
pub async fn serve_until_stdin_closes() -> anyhow::Result<()> {
    let (sink, echo) = (sink().await?, echo().await?);
    println!("{sink} {echo}");
    let _ = tokio::task::spawn_blocking(|| {
        use std::io::Read;
        let mut buf = [0u8; 1];
        let _ = std::io::stdin().read(&mut buf);
    })
    .await;
    Ok(())
}
