//! One slow client must not stall the others, and one stalled client must not make the proxy
//! hold more than one window for it. Shared by `postern-e2e` (for the agent on SSH and on QUIC)
//! and `postern-loadtest --isolation`.
//!
//! - [`isolation`]: client B pings a 64-byte echo at 10 Hz through the tunnel, first alone, then
//!   while client A (another SSH session) downloads from a hose target through the same tunnel,
//!   reading only `slow_kib_per_s`. B's round trips in both phases, and the proxy's peak RSS.
//! - [`stalled`]: A opens the hose and reads nothing at all; once the bytes the hose manages to
//!   write stop growing (every window on the way is full), the proxy's RSS growth since before A
//!   opened the stream is what the proxy holds for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use postern_client::ProxySession;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::proc_stats::rss_kib;

/// Which targets of which cluster the figures use.
#[derive(Debug, Clone)]
pub struct Targets {
    /// The cluster.
    pub cluster: String,
    /// A target that echoes (B's).
    pub echo: String,
    /// A target that writes far more than A will read (A's).
    pub hose: String,
}

/// What [`isolation`] measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IsolationReport {
    /// Seconds of pings per phase.
    pub secs: u64,
    /// A's read rate, KiB/s.
    pub slow_kib_per_s: u64,
    /// B's round trips alone, ms, sorted.
    pub alone_ms: Vec<f64>,
    /// B's round trips while A reads slowly, ms, sorted.
    pub during_ms: Vec<f64>,
    /// Bytes A read.
    pub slow_read_bytes: u64,
    /// The proxy's RSS before A started, KiB (0 without a pid).
    pub rss_before_kib: u64,
    /// The proxy's peak RSS while A was held back, KiB.
    pub rss_peak_kib: u64,
}

/// The `p` quantile (0..=1) of sorted samples.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

impl IsolationReport {
    /// B's (p50, p99) alone, ms.
    pub fn alone(&self) -> (f64, f64) {
        (pct(&self.alone_ms, 0.5), pct(&self.alone_ms, 0.99))
    }

    /// B's (p50, p99) while A reads slowly, ms.
    pub fn during(&self) -> (f64, f64) {
        (pct(&self.during_ms, 0.5), pct(&self.during_ms, 0.99))
    }

    /// B's p99 while A reads slowly over B's p99 alone (the target is at most 2).
    pub fn ratio(&self) -> f64 {
        self.during().1 / self.alone().1.max(0.001)
    }
}

/// B's round trips (ms) at 10 Hz for `secs`; a round trip that does not come back within 30 s
/// counts as 30,000 ms.
async fn pings(b: &ProxySession, t: &Targets, secs: u64) -> anyhow::Result<Vec<f64>> {
    let mut s = b.open(&t.echo, &t.cluster, 0).await?;
    let msg = [0x42u8; 64];
    let mut back = [0u8; 64];
    let mut out = Vec::new();
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while start.elapsed() < Duration::from_secs(secs) {
        tick.tick().await;
        let t = Instant::now();
        let rt = tokio::time::timeout(Duration::from_secs(30), async {
            s.write_all(&msg).await?;
            s.read_exact(&mut back).await?;
            Ok::<_, std::io::Error>(())
        })
        .await;
        out.push(match rt {
            Ok(Ok(())) => t.elapsed().as_secs_f64() * 1000.0,
            Ok(Err(e)) => anyhow::bail!("B's stream failed: {e}"),
            Err(_) => 30_000.0,
        });
    }
    out.sort_by(|a, b| a.total_cmp(b));
    Ok(out)
}

/// Runs both phases (`secs` each): B alone, then B while A reads the hose at `slow_kib_per_s`.
pub async fn isolation(
    a: Arc<ProxySession>,
    b: Arc<ProxySession>,
    t: &Targets,
    secs: u64,
    slow_kib_per_s: u64,
    proxy_pid: Option<u32>,
) -> anyhow::Result<IsolationReport> {
    let alone = pings(&b, t, secs).await?;
    let rss0 = proxy_pid.map(rss_kib).unwrap_or(0);
    // A: reads at most 16 KiB at a time and paces by bytes, not by reads: a read returns one
    // message of whatever size the proxy passed on (over QUIC, about one datagram's payload), so
    // a fixed pause per read would read far slower than `slow_kib_per_s`.
    let stop = tokio_util::sync::CancellationToken::new();
    let reader = {
        let (a, t, stop) = (a.clone(), t.clone(), stop.clone());
        tokio::spawn(async move {
            let mut s = a.open(&t.hose, &t.cluster, 0).await?;
            let mut buf = vec![0u8; 16 << 10];
            let rate = (slow_kib_per_s.max(1) * 1024) as f64;
            let start = Instant::now();
            let mut total = 0u64;
            while !stop.is_cancelled() {
                match s.read(&mut buf).await? {
                    0 => break,
                    n => total += n as u64,
                }
                let due = Duration::from_secs_f64(total as f64 / rate);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
            Ok::<u64, anyhow::Error>(total)
        })
    };
    // Let A's queues fill before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let peak = Arc::new(AtomicU64::new(rss0));
    let watch = proxy_pid.map(|pid| {
        let (peak, stop) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });
    let during = pings(&b, t, secs).await?;
    stop.cancel();
    let read = reader.await??;
    if let Some(w) = watch {
        let _ = w.await;
    }
    Ok(IsolationReport {
        secs,
        slow_kib_per_s,
        alone_ms: alone,
        during_ms: during,
        slow_read_bytes: read,
        rss_before_kib: rss0,
        rss_peak_kib: peak.load(Ordering::Relaxed),
    })
}

/// What [`stalled`] measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StallReport {
    /// The proxy's RSS before A opened the stream, KiB.
    pub rss_before_kib: u64,
    /// The proxy's RSS once the hose could write no more, KiB.
    pub rss_stalled_kib: u64,
    /// Bytes the hose wrote into the stream before it stalled (kernel buffers and every window
    /// on the way: agent, proxy, client).
    pub pushed_bytes: u64,
    /// Seconds until the hose stopped making progress.
    pub settle_secs: f64,
    /// Bytes the proxy passed on toward A's client (from its metrics), when the caller can read
    /// them: what left the proxy, as opposed to what it holds.
    #[serde(default)]
    pub passed_on_bytes: Option<u64>,
}

impl StallReport {
    /// The proxy's RSS growth, bytes.
    pub fn growth_bytes(&self) -> u64 {
        self.rss_stalled_kib.saturating_sub(self.rss_before_kib) * 1024
    }
}

/// A opens the hose and never reads. Polls `written` (the hose's byte counter) every 200 ms until
/// it has not grown for 2 s (at most 30 s), then reads the proxy's RSS; the stream is closed after.
pub async fn stalled(
    a: &ProxySession,
    t: &Targets,
    proxy_pid: u32,
    written: impl Fn() -> u64,
) -> anyhow::Result<StallReport> {
    // Let the allocator settle from whatever came before.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = rss_kib(proxy_pid);
    let w0 = written();
    let start = Instant::now();
    let stream = a.open(&t.hose, &t.cluster, 0).await?;
    let (mut last, mut since) = (w0, Instant::now());
    while start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let w = written();
        if w != last {
            (last, since) = (w, Instant::now());
        } else if since.elapsed() >= Duration::from_secs(2) && w > w0 {
            break;
        }
    }
    let settle = since.duration_since(start).as_secs_f64();
    let report = StallReport {
        rss_before_kib: rss0,
        rss_stalled_kib: rss_kib(proxy_pid),
        pushed_bytes: last - w0,
        settle_secs: settle,
        passed_on_bytes: None,
    };
    drop(stream);
    Ok(report)
}
