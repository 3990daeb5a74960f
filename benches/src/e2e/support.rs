//! Small pieces every part of the comparison uses: child processes that die with their guard,
//! free loopback ports, statistics.

use std::time::Duration;

use anyhow::bail;
use tokio::net::TcpStream;
use tokio::process::Child;

/// A child process killed when the guard drops (a failed run leaves no sshd or proxy behind).
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

impl Guard {
    /// The child's pid (0 once it has been reaped).
    pub fn pid(&self) -> u32 {
        self.0.id().unwrap_or(0)
    }
}

/// The median of `v` (0 when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// The `p` quantile (0..=1) of already sorted samples (0 when empty).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// A loopback TCP port nothing listens on now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits (at most 10 s) until something accepts on `127.0.0.1:port`.
pub async fn wait_port(port: u16) -> anyhow::Result<()> {
    for _ in 0..500 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("nothing listens on 127.0.0.1:{port} after 10 s")
}

/// `n` bytes as KiB, MiB or GiB, whichever reads better.
pub fn bytes(n: u64) -> String {
    if n >= 1 << 30 {
        format!("{:.1} GiB", n as f64 / 1073741824.0)
    } else if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / 1048576.0)
    } else {
        format!("{:.0} KiB", n as f64 / 1024.0)
    }
}
