//! `postern-loadtest`: N agents × M client streams against a running proxy, on loopback only.
//!
//! The agents are the real agent code (`postern_agent::run`, in-process), each serving target
//! `load` from a local echo service. Clients log in with user certificates and open streams to
//! `load.<cluster>`; each stream sends `--bytes` and reads them back. Bounded by `--streams`
//! and `--duration`, whichever comes first. Reports throughput, stream latency p50/p90/p99,
//! errors by kind, and (with `--proxy-pid`) the proxy's RSS and CPU from `/proc`.
//!
//! ```sh
//! postern-proxy certs init --dir ca/        # the proxy's cluster trusts ca/host_ca.pub and ca/user_ca.pub
//! postern-loadtest --tunnel 127.0.0.1:3024 --ca-dir ca --cluster example --agents 50 --streams 20000 --proxy-pid $(pidof postern-proxy)
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use postern_benches::proc_stats::{cpu_secs, rss_kib};
use postern_client::{ConnectOptions, ProxyAddr, ProxySession};
use postern_dial::mint::{self, CertSpec};
use postern_dial::ssh::Identity;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "postern-loadtest",
    about = "N agents x M streams against a running Postern proxy (loopback only)"
)]
struct Cli {
    /// The proxy's tunnel address (must be a loopback address).
    #[arg(long)]
    tunnel: SocketAddr,
    /// Directory with `host_ca` and `user_ca` private keys (`postern-proxy certs init --dir`).
    #[arg(long)]
    ca_dir: PathBuf,
    /// The cluster the proxy serves with those CAs.
    #[arg(long)]
    cluster: String,
    /// Agents to connect.
    #[arg(long, default_value_t = 10)]
    agents: usize,
    /// Client streams in all.
    #[arg(long, default_value_t = 10_000)]
    streams: u64,
    /// Streams in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Bytes each stream sends and reads back.
    #[arg(long, default_value_t = 65536)]
    bytes: usize,
    /// Client SSH sessions the streams are spread over.
    #[arg(long, default_value_t = 4)]
    sessions: usize,
    /// Stop after this many seconds at most (1..=600).
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// The proxy's pid, to report its RSS and CPU.
    #[arg(long)]
    proxy_pid: Option<u32>,
    /// Instead of the echo load: one stream whose service writes this many MiB to a client that
    /// never reads, for `--duration` seconds; reports the proxy's peak RSS.
    #[arg(long)]
    slow_consumer_mib: Option<u64>,
    /// Instead of the echo load: one client pings at 10 Hz, alone and then while another
    /// client downloads through the same tunnel at `--slow-kib-per-s` (`--duration` per phase).
    #[arg(long)]
    isolation: bool,
    /// The slow client's read rate for `--isolation`.
    #[arg(long, default_value_t = 128)]
    slow_kib_per_s: u64,
    /// Agents dial QUIC (the tunnel address's UDP twin) instead of SSH.
    #[arg(long)]
    quic: bool,
    /// Clients log in over QUIC (the tunnel address's UDP twin) instead of SSH.
    #[arg(long)]
    client_quic: bool,
}

/// A service that writes `mib` MiB to every connection, as fast as it is let.
async fn firehose(mib: u64) -> anyhow::Result<SocketAddr> {
    Ok(postern_benches::e2e::services::Hose::start(mib).await?.addr)
}

async fn echo() -> anyhow::Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let a = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(a)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Prints the `--isolation` figures.
fn print_isolation(r: &postern_benches::isolation::IsolationReport, proxy_pid: Option<u32>) {
    let ((p50a, p99a), (p50d, p99d)) = (r.alone(), r.during());
    println!(
        "\npostern-loadtest --isolation: B pings 64 B at 10 Hz for {} s per phase",
        r.secs
    );
    println!(
        "  B alone                     p50 {p50a:.2} ms  p99 {p99a:.2} ms  ({} pings)",
        r.alone_ms.len()
    );
    println!(
        "  B while A reads {} KiB/s   p50 {p50d:.2} ms  p99 {p99d:.2} ms  ({} pings; A read {:.1} MiB)",
        r.slow_kib_per_s,
        r.during_ms.len(),
        r.slow_read_bytes as f64 / 1048576.0
    );
    println!("  B's p99 during / alone      {:.2}x", r.ratio());
    if let Some(pid) = proxy_pid {
        println!(
            "  proxy (pid {pid}) RSS {} KiB before A, peak {} KiB while A was held back",
            r.rss_before_kib, r.rss_peak_kib
        );
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !cli.tunnel.ip().is_loopback() {
        bail!("--tunnel must be a loopback address: this tool only loads 127.0.0.0/8 or [::1]");
    }
    if !(1..=600).contains(&cli.duration) {
        bail!("--duration must be 1..=600 seconds");
    }
    let host_ca = mint::read_key(&cli.ca_dir.join("host_ca")).context("host_ca")?;
    let user_ca = mint::read_key(&cli.ca_dir.join("user_ca")).context("user_ca")?;
    let now = mint::now_unix();
    let dir = tempfile::tempdir()?;
    let service = match cli.slow_consumer_mib {
        Some(mib) => firehose(mib).await?,
        None => echo().await?,
    };
    // For --isolation: a download far larger than the slow client will read.
    let hose = firehose(1024).await?;
    let host_ca_line = host_ca.public_key().to_openssh()?;
    let stop = CancellationToken::new();

    // Agents: the real agent code, in-process.
    let mut agents = Vec::new();
    for i in 0..cli.agents {
        let key = mint::generate_key();
        let host_id = format!("load{i}");
        let cert = mint::issue(
            &host_ca,
            key.public_key(),
            &CertSpec::Agent {
                host_id: host_id.clone(),
                cluster: cli.cluster.clone(),
            },
            now - 60,
            now + 86400,
        )?;
        let path = dir.path().join(&host_id);
        mint::write_key_pair(&path, &key)?;
        mint::write_cert(&mint::cert_path(&path), &cert)?;
        let cfg = postern_agent::AgentConfig {
            host_id,
            cluster: cli.cluster.clone(),
            proxy: None,
            tunnel_addr: Some(cli.tunnel.to_string()),
            web: postern_agent::config::WebTrustConfig {
                insecure: true,
                ..Default::default()
            },
            host_key_file: path,
            host_cert_file: None,
            join_token_file: None,
            ca_pin: None,
            proxy_host_ca: vec![host_ca_line.clone()],
            proxy_host_keys: Vec::new(),
            targets: [
                ("load".to_string(), service.into()),
                ("hose".to_string(), hose.into()),
            ]
            .into(),
            keepalive_interval_secs: 15,
            reconnect: Default::default(),
            ops_listen: None,
            transport: if cli.quic {
                postern_agent::config::TransportConfig {
                    mode: postern_agent::config::TransportMode::Quic,
                    quic_addr: Some(cli.tunnel.to_string()),
                    ..Default::default()
                }
            } else {
                postern_agent::config::TransportConfig {
                    mode: postern_agent::config::TransportMode::Ssh,
                    ..Default::default()
                }
            },
            pool: Default::default(),
        };
        agents.push(tokio::spawn(postern_agent::run(cfg, stop.clone())));
    }

    // Client sessions.
    let mut sessions = Vec::new();
    let client_transport = if cli.client_quic {
        postern_client::Transport::Quic
    } else {
        postern_client::Transport::Ssh
    };
    for i in 0..cli.sessions.max(1) {
        let key = mint::generate_key();
        let user = format!("loaduser{i}");
        let cert = mint::issue(
            &user_ca,
            key.public_key(),
            &CertSpec::User { user: user.clone() },
            now - 60,
            now + 86400,
        )?;
        let opts = ConnectOptions {
            proxy: ProxyAddr::Tunnel(cli.tunnel.to_string()),
            user,
            identity: Identity::new(key, cert).map_err(anyhow::Error::msg)?,
            proxy_host_cas: vec![tunnel_proto::certs::ca_fingerprint(host_ca.public_key())],
            proxy_host_keys: vec![],
        };
        sessions.push(Arc::new(
            ProxySession::connect_over(&opts, client_transport)
                .await
                .context("client login")?,
        ));
    }
    // Wait until the agents' tunnels serve `load`.
    let ready = Instant::now();
    while sessions[0].open("load", &cli.cluster, 0).await.is_err() {
        if ready.elapsed() > Duration::from_secs(20) {
            bail!(
                "no agent tunnel for cluster {} after 20 s: does the proxy trust {}?",
                cli.cluster,
                cli.ca_dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    if cli.isolation {
        if sessions.len() < 2 {
            bail!("--isolation needs --sessions 2 or more (the slow client and the other one)");
        }
        let r = postern_benches::isolation::isolation(
            sessions[0].clone(),
            sessions[1].clone(),
            &postern_benches::isolation::Targets {
                cluster: cli.cluster.clone(),
                echo: "load".into(),
                hose: "hose".into(),
            },
            cli.duration,
            cli.slow_kib_per_s,
            cli.proxy_pid,
        )
        .await?;
        print_isolation(&r, cli.proxy_pid);
        stop.cancel();
        return Ok(());
    }
    if let Some(mib) = cli.slow_consumer_mib {
        let pid = cli
            .proxy_pid
            .context("--slow-consumer-mib needs --proxy-pid")?;
        let rss0 = rss_kib(pid);
        let stream = sessions[0].open("load", &cli.cluster, 0).await?;
        let mut peak = rss0;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(cli.duration) {
            peak = peak.max(rss_kib(pid));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(stream);
        tokio::time::sleep(Duration::from_secs(1)).await;
        println!(
            "slow consumer: the service offered {mib} MiB to a client that never read, for {} s; proxy RSS {rss0} KiB before, peak {peak} KiB (+{} KiB), {} KiB after the stream closed",
            cli.duration,
            peak.saturating_sub(rss0),
            rss_kib(pid)
        );
        stop.cancel();
        return Ok(());
    }
    let (rss0, cpu0) = cli
        .proxy_pid
        .map(|p| (rss_kib(p), cpu_secs(p)))
        .unwrap_or((0, 0.0));
    let peak = Arc::new(AtomicU64::new(rss0));
    if let Some(pid) = cli.proxy_pid {
        let (peak, stop) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }

    let bar = ProgressBar::new(cli.streams);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} streams {per_sec} {msg}",
        )?
        .progress_chars("=> "),
    );
    let next = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(cli.streams as usize)));
    let errors = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let deadline = Instant::now() + Duration::from_secs(cli.duration);
    let payload = Arc::new(vec![0x5au8; cli.bytes]);
    let start = Instant::now();
    let mut workers = Vec::new();
    for w in 0..cli.concurrency {
        let (next, lat, errs, bar, payload) = (
            next.clone(),
            latencies.clone(),
            errors.clone(),
            bar.clone(),
            payload.clone(),
        );
        let session = sessions[w % sessions.len()].clone();
        let (cluster, total) = (cli.cluster.clone(), cli.streams);
        workers.push(tokio::spawn(async move {
            let mut back = vec![0u8; payload.len()];
            while Instant::now() < deadline && next.fetch_add(1, Ordering::Relaxed) < total {
                let t = Instant::now();
                let r = async {
                    let mut s = session
                        .open("load", &cluster, 0)
                        .await
                        .map_err(|e| format!("open: {e}"))?;
                    let (mut rd, mut wr) = tokio::io::split(&mut s);
                    let send = async {
                        wr.write_all(&payload)
                            .await
                            .map_err(|e| format!("write: {e}"))
                    };
                    let recv = async {
                        rd.read_exact(&mut back)
                            .await
                            .map_err(|e| format!("read: {e}"))
                    };
                    tokio::try_join!(send, recv)?;
                    if back != *payload {
                        return Err("echo mismatch".to_string());
                    }
                    Ok::<_, String>(())
                };
                match tokio::time::timeout(Duration::from_secs(30), r).await {
                    Ok(Ok(())) => lat.lock().unwrap().push(t.elapsed().as_secs_f64() * 1000.0),
                    Ok(Err(e)) => {
                        *errs
                            .lock()
                            .unwrap()
                            .entry(e.split(':').next().unwrap_or("").to_string())
                            .or_default() += 1
                    }
                    Err(_) => *errs.lock().unwrap().entry("timeout".into()).or_default() += 1,
                }
                bar.inc(1);
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    bar.finish();
    let (rss1, cpu1) = cli
        .proxy_pid
        .map(|p| (rss_kib(p), cpu_secs(p)))
        .unwrap_or((0, 0.0));
    stop.cancel();
    for a in agents {
        let _ = a.await;
    }

    let mut lat = latencies.lock().unwrap().clone();
    lat.sort_by(|a, b| a.total_cmp(b));
    let done = lat.len() as f64;
    let errs = errors.lock().unwrap().clone();
    println!(
        "\npostern-loadtest: {} agents, {} sessions, {} concurrent, {} bytes/stream, {elapsed:.1} s",
        cli.agents, cli.sessions, cli.concurrency, cli.bytes
    );
    println!("  streams ok      {:.0} ({:.0}/s)", done, done / elapsed);
    println!(
        "  throughput      {:.1} MiB/s each way",
        done * cli.bytes as f64 / 1048576.0 / elapsed
    );
    println!(
        "  stream latency  p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  (open + echo of the payload)",
        pct(&lat, 0.5),
        pct(&lat, 0.9),
        pct(&lat, 0.99)
    );
    println!(
        "  errors          {}",
        if errs.is_empty() {
            "none".to_string()
        } else {
            format!("{errs:?}")
        }
    );
    if let Some(pid) = cli.proxy_pid {
        println!(
            "  proxy (pid {pid}) RSS {} -> {} KiB (peak {} KiB); CPU {:.1} s ({:.0}% of one core)",
            rss0,
            rss1,
            peak.load(Ordering::Relaxed),
            cpu1 - cpu0,
            (cpu1 - cpu0) / elapsed * 100.0
        );
    }
    Ok(())
}
