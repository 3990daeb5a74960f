//! The measurements every system gets: throughput on one and many streams, 64-byte
//! request/response latency, RSS per idle stream, CPU per GiB.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use postern_client::ProxySession;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::support::{median, percentile};
use super::{Cli, Row};
use crate::proc_stats::{cpu_secs, rss_sum};

/// A byte stream of any system.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
/// A boxed [`Io`].
pub type Stream = Box<dyn Io>;

/// How a system opens a stream to the sink or the echo service.
#[derive(Clone)]
pub enum Dialer {
    /// Plain TCP: the services themselves (direct) or OpenSSH's `-L` ports.
    Tcp {
        /// The sink (or what forwards to it).
        sink: SocketAddr,
        /// The echo (or what forwards to it).
        echo: SocketAddr,
    },
    /// Streams through a Postern proxy, targets `sink.bench` and `echo.bench`.
    Postern {
        /// The logged-in client session.
        session: Arc<ProxySession>,
    },
}

impl Dialer {
    /// Opens a stream to the echo (`echo`) or the sink.
    pub async fn open(&self, echo: bool) -> anyhow::Result<Stream> {
        Ok(match self {
            Dialer::Tcp { sink, echo: e } => {
                let s = TcpStream::connect(if echo { e } else { sink }).await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            Dialer::Postern { session } => Box::new(
                session
                    .open(if echo { "echo" } else { "sink" }, "bench", 0)
                    .await?,
            ),
        })
    }
}

/// 256 KiB of zeros: what every push writes.
pub static ZEROS: [u8; 256 * 1024] = [0u8; 256 * 1024];

/// Sends `bytes` into `s`, closes the write side, waits for the sink's count.
async fn push(mut s: impl AsyncRead + AsyncWrite + Unpin, bytes: u64) -> anyhow::Result<()> {
    let mut left = bytes;
    while left > 0 {
        let n = left.min(ZEROS.len() as u64) as usize;
        s.write_all(&ZEROS[..n]).await?;
        left -= n as u64;
    }
    s.shutdown().await?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count)
        .await
        .context("no byte count from the sink")?;
    let got = u64::from_be_bytes(count);
    if got != bytes {
        bail!("the sink got {got} bytes of {bytes}");
    }
    Ok(())
}

/// MiB/s of `bytes` pushed to the sink over `streams` streams at once.
pub async fn throughput(d: &Dialer, bytes: u64, streams: usize) -> anyhow::Result<f64> {
    let per = bytes / streams as u64;
    let mut opened = Vec::new();
    for _ in 0..streams {
        opened.push(d.open(false).await?);
    }
    let start = Instant::now();
    let tasks: Vec<_> = opened
        .into_iter()
        .map(|s| tokio::spawn(push(s, per)))
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok((per * streams as u64) as f64 / 1048576.0 / start.elapsed().as_secs_f64())
}

/// 64-byte request/response at 1,000 req/s on one stream: RTTs in microseconds, sorted.
pub async fn latency(d: &Dialer, secs: u64) -> anyhow::Result<Vec<f64>> {
    let mut s = d.open(true).await?;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let req = [7u8; 64];
    let mut resp = [0u8; 64];
    let mut rtts = Vec::new();
    // Warm-up, not recorded.
    for i in 0..(secs * 1000 + 200) {
        tick.tick().await;
        let t = Instant::now();
        s.write_all(&req).await?;
        s.read_exact(&mut resp).await?;
        if i >= 200 {
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    rtts.sort_by(|a, b| a.total_cmp(b));
    Ok(rtts)
}

/// Opens `n` echo streams (each proven with a one-byte echo) and measures the RSS growth of
/// `pids`: KiB per stream.
pub async fn idle_streams(
    d: &Dialer,
    n: usize,
    pids: impl Fn() -> Vec<u32>,
) -> anyhow::Result<f64> {
    let before = rss_sum(&pids());
    let mut held = Vec::with_capacity(n);
    let mut pending = Vec::new();
    for i in 0..n {
        let d = d.clone();
        pending.push(tokio::spawn(async move {
            let mut s = d.open(true).await?;
            s.write_all(b"x").await?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await?;
            anyhow::Ok(s)
        }));
        if pending.len() == 64 || i + 1 == n {
            for p in pending.drain(..) {
                held.push(p.await??);
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_sum(&pids());
    drop(held);
    Ok((after.saturating_sub(before)) as f64 / n as f64)
}

/// One system's row: throughput (CPU of `cpu_pids` during the single-stream runs), the
/// many-stream aggregate, and latency. The caller adds the idle-stream figure.
pub async fn measure(
    name: &str,
    cipher: &str,
    d: &Dialer,
    cli: &Cli,
    cpu_pids: &dyn Fn() -> Vec<u32>,
) -> anyhow::Result<Row> {
    let bytes = cli.mib * 1048576;
    let mut row = Row {
        system: name.into(),
        cipher: cipher.into(),
        ..Default::default()
    };
    let cpu0: f64 = cpu_pids().iter().map(|p| cpu_secs(*p)).sum();
    for _ in 0..cli.runs {
        row.single_mib_s.push(throughput(d, bytes, 1).await?);
    }
    let cpu1: f64 = cpu_pids().iter().map(|p| cpu_secs(*p)).sum();
    if !cpu_pids().is_empty() {
        row.cpu_s_per_gib = Some((cpu1 - cpu0) / (cli.runs as f64 * cli.mib as f64 / 1024.0));
    }
    for _ in 0..cli.runs {
        row.multi_mib_s
            .push(throughput(d, bytes, cli.streams).await?);
    }
    let rtts = latency(d, cli.latency_secs).await?;
    row.p50_us = percentile(&rtts, 0.50);
    row.p99_us = percentile(&rtts, 0.99);
    eprintln!(
        "  {name:<36} {cipher:<30} single {:>7.0} MiB/s  x{} {:>7.0} MiB/s  p50 {:>5.0} us  p99 {:>5.0} us",
        median(&row.single_mib_s),
        cli.streams,
        median(&row.multi_mib_s),
        row.p50_us,
        row.p99_us
    );
    Ok(row)
}
