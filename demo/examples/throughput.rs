//! A first throughput probe (not the issue #6 benchmark): one stream of N MiB through
//! client → proxy → agent → sink, against the same bytes over direct loopback TCP, in one run.
//!
//! `cargo run --release -p postern-demo --example throughput -- 1024`

use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A sink that reads until EOF, then writes back the byte count as 8 bytes.
async fn sink() -> anyhow::Result<std::net::SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
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
            });
        }
    });
    Ok(addr)
}

async fn push<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    mib: u64,
) -> anyhow::Result<f64> {
    let chunk = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    for _ in 0..mib {
        s.write_all(&chunk).await?;
    }
    s.shutdown().await?;
    let mut n = [0u8; 8];
    s.read_exact(&mut n).await?;
    anyhow::ensure!(
        u64::from_be_bytes(n) == mib << 20,
        "sink counted {} bytes",
        u64::from_be_bytes(n)
    );
    Ok(mib as f64 / start.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mib: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1024);
    let sink_addr = sink().await?;
    let direct = push(TcpStream::connect(sink_addr).await?, mib).await?;

    let dir = tempfile::tempdir()?;
    let (demo, _report) = postern_demo::run_with_target(dir.path(), Some(sink_addr)).await?;
    let stream = demo.session.open("auth", postern_demo::CLUSTER, 0).await?;
    let postern = push(stream, mib).await?;
    println!();
    println!("| path | MiB/s | x direct |");
    println!("|---|---|---|");
    println!("| direct loopback TCP | {direct:.0} | 1.00 |");
    println!(
        "| Postern (client → proxy → agent; cipher as negotiated) | {postern:.0} | {:.2} |",
        postern / direct
    );
    demo.stop().await?;
    Ok(())
}
