//! `--isolation`: one slow client must not stall the others.
//!
//! Client B pings a 64-byte echo at 10 Hz through the tunnel, first alone, then while client A
//! (another SSH session) downloads from the `hose` target through the same tunnel reading only
//! `--slow-kib-per-s`. Prints B's round-trip p50/p99 in both phases, their ratio, and the proxy's
//! RSS while A is held back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use postern_benches::proc_stats::rss_kib;
use postern_client::ProxySession;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::pct;

/// B's round trips (ms) at 10 Hz for `secs`; a round trip that does not come back within 30 s
/// counts as 30,000 ms.
async fn pings(b: &ProxySession, cluster: &str, secs: u64) -> anyhow::Result<Vec<f64>> {
    let mut s = b.open("load", cluster, 0).await?;
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

/// Runs both phases and prints the figures.
pub async fn run(
    a: Arc<ProxySession>,
    b: Arc<ProxySession>,
    cluster: &str,
    secs: u64,
    slow_kib_per_s: u64,
    proxy_pid: Option<u32>,
) -> anyhow::Result<()> {
    let alone = pings(&b, cluster, secs).await?;
    let rss0 = proxy_pid.map(rss_kib).unwrap_or(0);
    // A: reads 16 KiB at a time, paced to `slow_kib_per_s`.
    let stop = tokio_util::sync::CancellationToken::new();
    let reader = {
        let (a, cluster, stop) = (a.clone(), cluster.to_owned(), stop.clone());
        tokio::spawn(async move {
            let mut s = a.open("hose", &cluster, 0).await?;
            let mut buf = vec![0u8; 16 << 10];
            let pause = Duration::from_secs_f64(16.0 / slow_kib_per_s.max(1) as f64);
            let mut total = 0u64;
            while !stop.is_cancelled() {
                match s.read(&mut buf).await? {
                    0 => break,
                    n => total += n as u64,
                }
                tokio::time::sleep(pause).await;
            }
            Ok::<u64, anyhow::Error>(total)
        })
    };
    // Let A's queues fill before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(rss0));
    let watch = proxy_pid.map(|pid| {
        let (peak, stop) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                peak.fetch_max(rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });
    let during = pings(&b, cluster, secs).await?;
    stop.cancel();
    let read = reader.await??;
    if let Some(w) = watch {
        let _ = w.await;
    }
    let (p50a, p99a) = (pct(&alone, 0.5), pct(&alone, 0.99));
    let (p50d, p99d) = (pct(&during, 0.5), pct(&during, 0.99));
    println!("\npostern-loadtest --isolation: B pings 64 B at 10 Hz for {secs} s per phase");
    println!(
        "  B alone                     p50 {p50a:.2} ms  p99 {p99a:.2} ms  ({} pings)",
        alone.len()
    );
    println!(
        "  B while A reads {slow_kib_per_s} KiB/s   p50 {p50d:.2} ms  p99 {p99d:.2} ms  ({} pings; A read {:.1} MiB)",
        during.len(),
        read as f64 / 1048576.0
    );
    println!(
        "  B's p99 during / alone      {:.2}x",
        p99d / p99a.max(0.001)
    );
    if let Some(pid) = proxy_pid {
        println!(
            "  proxy (pid {pid}) RSS {rss0} KiB before A, peak {} KiB while A was held back",
            peak.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    Ok(())
}
