//! `postern-e2e`: the end-to-end comparison, one run, one table.
//!
//! The job: a client reaches a TCP service behind NAT, every leg encrypted and
//! certificate-authenticated. Compared on this machine, in the same run:
//! - **direct** loopback TCP (the ceiling);
//! - **Postern**: client → `postern-proxy` → `postern-agent` → service (real binaries, the Rust
//!   client, and `ssh -W` through the proxy);
//! - **OpenSSH**: the service side runs `ssh -N -R` into a loopback `sshd`, the client side
//!   `ssh -N -L` into the same `sshd` (two encrypted legs, like Postern's).
//!
//! Each cipher runs in a child process of its own (`--phase`), with `POSTERN_SSH_CIPHERS` set
//! for Postern and `-o Ciphers=` for OpenSSH. Run it through `benches/compare.sh`, which builds
//! the release binaries, installs OpenSSH and raises the file limit.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use postern_benches::proc_stats::{cpu_secs, rss_sum, tree};
use postern_client::{ConnectOptions, ProxyAddr, ProxySession};
use postern_dial::mint::{self, CertSpec};
use postern_dial::ssh::{Identity, ProxyVerifier};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

#[derive(Parser, Clone)]
#[command(
    name = "postern-e2e",
    about = "Postern vs OpenSSH vs direct loopback, in one run"
)]
struct Cli {
    /// Ciphers to compare (OpenSSH names).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com"
    )]
    ciphers: Vec<String>,
    /// Repetitions of each throughput figure (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// MiB sent per throughput run.
    #[arg(long, default_value_t = 1024)]
    mib: u64,
    /// Concurrent streams for the aggregate figure.
    #[arg(long, default_value_t = 64)]
    streams: usize,
    /// Idle streams held open for the memory figure.
    #[arg(long, default_value_t = 10_000)]
    idle_streams: usize,
    /// Agents logged in for the idle-tunnel and set-up figures.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Seconds of 64-byte request/response at 1,000 req/s.
    #[arg(long, default_value_t = 5)]
    latency_secs: u64,
    /// Where postern-proxy and postern-agent are [default: next to this binary].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Write the table as Markdown here too.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Internal: run one cipher and print JSON.
    #[arg(long, hide = true)]
    phase: Option<String>,
    /// Internal: serve the sink and echo services (a process of their own, so that the driver's
    /// descriptors go to client sockets only), print their addresses, run until stdin closes.
    #[arg(long, hide = true)]
    services: bool,
}

/// One system's figures for one cipher.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Row {
    system: String,
    cipher: String,
    single_mib_s: Vec<f64>,
    multi_mib_s: Vec<f64>,
    p50_us: f64,
    p99_us: f64,
    rss_per_stream_kib: Option<f64>,
    cpu_s_per_gib: Option<f64>,
}

/// What one phase (cipher) measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Phase {
    rows: Vec<Row>,
    tunnel_rss_kib: f64,
    setups_per_s: f64,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Kills its child on drop.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

impl Guard {
    fn pid(&self) -> u32 {
        self.0.id().unwrap_or(0)
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Stream = Box<dyn Io>;

/// How a system opens a stream to the sink or the echo service.
#[derive(Clone)]
enum Dialer {
    Tcp { sink: SocketAddr, echo: SocketAddr },
    Postern { session: Arc<ProxySession> },
}

impl Dialer {
    async fn open(&self, echo: bool) -> anyhow::Result<Stream> {
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

/// Reads to EOF, then answers the byte count (8 bytes, big-endian).
async fn sink_service() -> anyhow::Result<SocketAddr> {
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

async fn echo_service() -> anyhow::Result<SocketAddr> {
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

static ZEROS: [u8; 256 * 1024] = [0u8; 256 * 1024];

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

async fn throughput(d: &Dialer, bytes: u64, streams: usize) -> anyhow::Result<f64> {
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
async fn latency(d: &Dialer, secs: u64) -> anyhow::Result<Vec<f64>> {
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

/// Opens `n` echo streams (each proven with a one-byte echo), measures the RSS growth of `pids`.
async fn idle_streams(d: &Dialer, n: usize, pids: impl Fn() -> Vec<u32>) -> anyhow::Result<f64> {
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

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_port(port: u16) -> anyhow::Result<()> {
    for _ in 0..500 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("nothing listens on 127.0.0.1:{port} after 10 s")
}

struct PosternSetup {
    _proxy: Guard,
    _agent: Guard,
    proxy_pid: u32,
    agent_pid: u32,
    tunnel: SocketAddr,
    session: Arc<ProxySession>,
    host_ca: russh::keys::PrivateKey,
    user_key: PathBuf,
    known_hosts: PathBuf,
}

async fn start_postern(
    dir: &Path,
    bin: &Path,
    sink: SocketAddr,
    echo: SocketAddr,
) -> anyhow::Result<PosternSetup> {
    let host_ca = mint::generate_key();
    let user_ca = mint::generate_key();
    let now = mint::now_unix();
    let line =
        |k: &russh::keys::PrivateKey| k.public_key().to_openssh().map_err(anyhow::Error::from);
    let (web, tunnel, ops) = (free_port()?, free_port()?, free_port()?);
    let pdir = dir.join("proxy");
    std::fs::write(
        dir.join("proxy.toml"),
        format!(
            "data_dir = {pdir:?}\nallow_root = true\n[listen]\nweb = \"127.0.0.1:{web}\"\ntunnel = \"127.0.0.1:{tunnel}\"\nops = \"127.0.0.1:{ops}\"\n\
             [limits]\nmax_unauthenticated = 4096\nmax_unauthenticated_per_source = 4096\nmax_streams_per_user_per_target = 100000\nmax_streams_per_tunnel = 100000\nmax_streams_per_client = 100000\nmax_tunnels_per_cluster = 100000\nmax_connects_per_source_per_minute = 100000\n\
             [[clusters]]\nname = \"bench\"\nhost_ca = [{:?}]\nuser_ca = [{:?}]\npolicy = {{ source = \"open\" }}\n",
            line(&host_ca)?,
            line(&user_ca)?
        ),
    )?;
    let pkey = mint::generate_key();
    let pcert = mint::issue(
        &host_ca,
        pkey.public_key(),
        &CertSpec::Proxy {
            principals: vec!["127.0.0.1".into()],
        },
        now - 60,
        now + 86400,
    )?;
    mint::write_key_pair(&pdir.join("ssh_host_ed25519_key"), &pkey)?;
    mint::write_cert(&pdir.join("ssh_host_ed25519_key-cert.pub"), &pcert)?;
    let proxy = Guard(
        Command::new(bin.join("postern-proxy"))
            .arg("--config")
            .arg(dir.join("proxy.toml"))
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting postern-proxy (build it: cargo build --release -p postern-proxy)")?,
    );
    wait_port(tunnel).await?;

    let akey = mint::generate_key();
    let acert = mint::issue(
        &host_ca,
        akey.public_key(),
        &CertSpec::Agent {
            host_id: "a1".into(),
            cluster: "bench".into(),
        },
        now - 60,
        now + 86400,
    )?;
    let akey_path = dir.join("agent_key");
    mint::write_key_pair(&akey_path, &akey)?;
    mint::write_cert(&mint::cert_path(&akey_path), &acert)?;
    std::fs::write(
        dir.join("agent.toml"),
        format!(
            "host_id = \"a1\"\ncluster = \"bench\"\ntunnel_addr = \"127.0.0.1:{tunnel}\"\nhost_key_file = {akey_path:?}\n\
             proxy_host_ca = [{:?}]\n[web]\ninsecure = true\n[targets]\nsink = \"{sink}\"\necho = \"{echo}\"\n",
            line(&host_ca)?
        ),
    )?;
    let agent = Guard(
        Command::new(bin.join("postern-agent"))
            .arg("--config")
            .arg(dir.join("agent.toml"))
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting postern-agent")?,
    );

    let ukey = mint::generate_key();
    let ucert = mint::issue(
        &user_ca,
        ukey.public_key(),
        &CertSpec::User {
            user: "bench".into(),
        },
        now - 60,
        now + 86400,
    )?;
    let user_key = dir.join("user");
    mint::write_key_pair(&user_key, &ukey)?;
    mint::write_cert(&mint::cert_path(&user_key), &ucert)?;
    let known_hosts = dir.join("known_hosts");
    std::fs::write(
        &known_hosts,
        format!("@cert-authority * {}\n", line(&host_ca)?),
    )?;
    let opts = ConnectOptions {
        proxy: ProxyAddr::Tunnel(format!("127.0.0.1:{tunnel}")),
        user: "bench".into(),
        identity: Identity::new(ukey, ucert).map_err(anyhow::Error::msg)?,
        proxy_host_cas: vec![tunnel_proto::certs::ca_fingerprint(host_ca.public_key())],
        proxy_host_keys: vec![],
    };
    let session = Arc::new(ProxySession::connect(&opts).await?);
    for _ in 0..500 {
        if session.open("echo", "bench", 0).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(PosternSetup {
        proxy_pid: proxy.pid(),
        agent_pid: agent.pid(),
        _proxy: proxy,
        _agent: agent,
        tunnel: format!("127.0.0.1:{tunnel}").parse()?,
        session,
        host_ca,
        user_key,
        known_hosts,
    })
}

/// `ssh -W sink.bench` through the Postern proxy: one 1 GiB push through OpenSSH's client.
async fn ssh_w_push(p: &PosternSetup, cipher: &str, bytes: u64) -> anyhow::Result<f64> {
    let mut child = Command::new("ssh")
        .args([
            "-F",
            "/dev/null",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", p.known_hosts.display()))
        .arg("-o")
        .arg(format!(
            "CertificateFile={}",
            mint::cert_path(&p.user_key).display()
        ))
        .arg("-i")
        .arg(&p.user_key)
        .args([
            "-o",
            &format!("Ciphers={cipher}"),
            "-p",
            &p.tunnel.port().to_string(),
            "-l",
            "bench",
            "-W",
            "sink.bench:3025",
            "127.0.0.1",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("ssh (apt-get install openssh-client)")?;
    let (mut stdin, mut stdout) = (child.stdin.take().unwrap(), child.stdout.take().unwrap());
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let mut left = bytes;
        while left > 0 {
            let n = left.min(ZEROS.len() as u64) as usize;
            stdin.write_all(&ZEROS[..n]).await?;
            left -= n as u64;
        }
        drop(stdin);
        anyhow::Ok(())
    });
    let mut count = [0u8; 8];
    stdout
        .read_exact(&mut count)
        .await
        .context("ssh -W: no count back")?;
    writer.await??;
    let secs = start.elapsed().as_secs_f64();
    let _ = child.kill().await;
    if u64::from_be_bytes(count) != bytes {
        bail!(
            "ssh -W: the sink got {} of {bytes} bytes",
            u64::from_be_bytes(count)
        );
    }
    Ok(bytes as f64 / 1048576.0 / secs)
}

struct AgentHandler(ProxyVerifier);

impl russh::client::Handler for AgentHandler {
    type Error = russh::Error;
    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(self.0.verify(key))
    }
}

/// Logs in `n` agents (64 at a time): set-ups per second, and the proxy's RSS per idle tunnel.
async fn tunnels(p: &PosternSetup, n: usize) -> anyhow::Result<(f64, f64)> {
    let now = mint::now_unix();
    let mut ids = Vec::new();
    for i in 0..n {
        let k = mint::generate_key();
        let c = mint::issue(
            &p.host_ca,
            k.public_key(),
            &CertSpec::Agent {
                host_id: format!("t{i}"),
                cluster: "bench".into(),
            },
            now - 60,
            now + 3600,
        )?;
        ids.push((
            format!("t{i}"),
            Identity::new(k, c).map_err(anyhow::Error::msg)?,
        ));
    }
    let ca = tunnel_proto::certs::ca_fingerprint(p.host_ca.public_key());
    let config = Arc::new(postern_dial::ssh::client_config(Duration::from_secs(60)));
    let before = rss_sum(&[p.proxy_pid]);
    let start = Instant::now();
    let mut held = Vec::new();
    let mut pending = Vec::new();
    let addr = p.tunnel.to_string();
    let total = ids.len();
    for (i, (host, id)) in ids.into_iter().enumerate() {
        let (config, addr) = (config.clone(), addr.clone());
        pending.push(tokio::spawn(async move {
            let v = ProxyVerifier::new("127.0.0.1", vec![ca], vec![]);
            let login = tunnel_proto::names::agent_login(&host, "bench");
            let h =
                postern_dial::ssh::login(&addr, config, AgentHandler(v.clone()), &v, &login, &id)
                    .await?;
            h.tcpip_forward("echo", 0).await?;
            anyhow::Ok(h)
        }));
        if pending.len() == 64 || i + 1 == total {
            for t in pending.drain(..) {
                held.push(t.await??);
            }
        }
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_sum(&[p.proxy_pid]);
    drop(held);
    Ok((rate, after.saturating_sub(before) as f64 / n as f64))
}

struct OpenSshSetup {
    _sshd: Guard,
    _r: Guard,
    _l: Guard,
    pids: Vec<u32>,
    sink: SocketAddr,
    echo: SocketAddr,
}

async fn start_openssh(
    dir: &Path,
    cipher: &str,
    sink: SocketAddr,
    echo: SocketAddr,
) -> anyhow::Result<OpenSshSetup> {
    let sshd_bin = ["/usr/sbin/sshd", "/usr/bin/sshd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("sshd not found (apt-get install openssh-server)")?;
    let _ = std::fs::create_dir_all("/run/sshd");
    let keygen = |path: &Path| {
        std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(path)
            .status()
    };
    let (hk, uk) = (dir.join("sshd_host_key"), dir.join("ssh_user_key"));
    keygen(&hk)?;
    keygen(&uk)?;
    std::fs::copy(dir.join("ssh_user_key.pub"), dir.join("authorized_keys"))?;
    let port = free_port()?;
    let cfg = dir.join("sshd_config");
    std::fs::write(
        &cfg,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\nStrictModes no\nUsePAM no\n\
             PermitRootLogin yes\nPubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             AllowTcpForwarding yes\nCiphers {cipher}\nMaxStartups 1000\nLogLevel ERROR\n",
            hk.display(),
            dir.join("authorized_keys").display(),
            dir.join("sshd.pid").display()
        ),
    )?;
    let sshd = Guard(
        Command::new(sshd_bin)
            .arg("-D")
            .arg("-f")
            .arg(&cfg)
            .arg("-E")
            .arg(dir.join("sshd.log"))
            .kill_on_drop(true)
            .spawn()?,
    );
    wait_port(port).await?;
    let (r_sink, r_echo, l_sink, l_echo) = (free_port()?, free_port()?, free_port()?, free_port()?);
    let ssh = |fwd: Vec<String>| {
        let mut c = Command::new("ssh");
        c.args([
            "-F",
            "/dev/null",
            "-N",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "LogLevel=ERROR",
        ])
        .args(["-o", &format!("Ciphers={cipher}"), "-i"])
        .arg(&uk)
        .args(["-p", &port.to_string()])
        .args(fwd)
        .arg("127.0.0.1")
        .kill_on_drop(true);
        c
    };
    let r = Guard(
        ssh(vec![
            "-R".into(),
            format!("{r_sink}:{sink}"),
            "-R".into(),
            format!("{r_echo}:{echo}"),
        ])
        .spawn()?,
    );
    wait_port(r_echo).await?;
    let l = Guard(
        ssh(vec![
            "-L".into(),
            format!("{l_sink}:127.0.0.1:{r_sink}"),
            "-L".into(),
            format!("{l_echo}:127.0.0.1:{r_echo}"),
        ])
        .spawn()?,
    );
    wait_port(l_echo).await?;
    let pids = vec![sshd.pid(), r.pid(), l.pid()];
    Ok(OpenSshSetup {
        _sshd: sshd,
        _r: r,
        _l: l,
        pids,
        sink: format!("127.0.0.1:{l_sink}").parse()?,
        echo: format!("127.0.0.1:{l_echo}").parse()?,
    })
}

async fn measure(
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
        "  {name:<22} {cipher:<30} single {:>7.0} MiB/s  x{} {:>7.0} MiB/s  p50 {:>5.0} us  p99 {:>5.0} us",
        median(&row.single_mib_s),
        cli.streams,
        median(&row.multi_mib_s),
        row.p50_us,
        row.p99_us
    );
    Ok(row)
}

async fn phase(cli: &Cli, cipher: &str) -> anyhow::Result<Phase> {
    let bin = match &cli.bin_dir {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("exe dir")?
            .to_path_buf(),
    };
    let dir = tempfile::tempdir()?;
    let mut services = Command::new(std::env::current_exe()?)
        .arg("--services")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut line = String::new();
    {
        use tokio::io::AsyncBufReadExt;
        let mut out = tokio::io::BufReader::new(services.stdout.take().context("services stdout")?);
        out.read_line(&mut line).await?;
    }
    let mut addrs = line.split_whitespace().map(|a| a.parse::<SocketAddr>());
    let (sink, echo) = match (addrs.next(), addrs.next()) {
        (Some(Ok(s)), Some(Ok(e))) => (s, e),
        _ => bail!("the services process said {line:?}"),
    };
    let mut out = Phase::default();

    let direct = Dialer::Tcp { sink, echo };
    out.rows
        .push(measure("direct loopback", "-", &direct, cli, &Vec::new).await?);

    let p = start_postern(dir.path(), &bin, sink, echo).await?;
    let (pp, ap) = (p.proxy_pid, p.agent_pid);
    // Idle tunnels first, on a proxy whose heap stream traffic has not grown yet.
    let (rate, per_tunnel) = tunnels(&p, cli.agents).await?;
    out.setups_per_s = rate;
    out.tunnel_rss_kib = per_tunnel;
    eprintln!("  tunnel set-ups {rate:.0}/s, proxy RSS per idle tunnel {per_tunnel:.1} KiB");
    let d = Dialer::Postern {
        session: p.session.clone(),
    };
    let mut row = measure("Postern (Rust client)", cipher, &d, cli, &|| vec![pp, ap]).await?;
    row.rss_per_stream_kib = Some(idle_streams(&d, cli.idle_streams, || vec![pp, ap]).await?);
    out.rows.push(row);
    let mut w = Row {
        system: "Postern (ssh -W)".into(),
        cipher: cipher.into(),
        ..Default::default()
    };
    for _ in 0..cli.runs {
        w.single_mib_s
            .push(ssh_w_push(&p, cipher, cli.mib * 1048576).await?);
    }
    eprintln!(
        "  {:<22} {cipher:<30} single {:>7.0} MiB/s",
        w.system,
        median(&w.single_mib_s)
    );
    out.rows.push(w);
    drop(p);

    let o = start_openssh(dir.path(), cipher, sink, echo).await?;
    let pids = o.pids.clone();
    let all = move || pids.iter().flat_map(|p| tree(*p)).collect::<Vec<u32>>();
    let d = Dialer::Tcp {
        sink: o.sink,
        echo: o.echo,
    };
    let mut row = measure("OpenSSH -R + -L chain", cipher, &d, cli, &all).await?;
    row.rss_per_stream_kib = Some(idle_streams(&d, cli.idle_streams, &all).await?);
    out.rows.push(row);
    drop(o);
    Ok(out)
}

fn table(phases: &[Phase], cli: &Cli) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "| system | cipher | 1 stream MiB/s (median of {}) | × direct | × OpenSSH | {} streams MiB/s | × OpenSSH | p50 / p99 µs (64 B @ 1k/s) | p99 added over direct | RSS per idle stream | CPU-s per GiB |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
        cli.runs, cli.streams
    ));
    for ph in phases {
        let direct = ph
            .rows
            .iter()
            .find(|r| r.system == "direct loopback")
            .cloned()
            .unwrap_or_default();
        let ossh = ph
            .rows
            .iter()
            .find(|r| r.system.starts_with("OpenSSH"))
            .cloned()
            .unwrap_or_default();
        for r in &ph.rows {
            let single = median(&r.single_mib_s);
            let multi = median(&r.multi_mib_s);
            let ratio = |a: f64, b: f64| {
                if b > 0.0 && a > 0.0 {
                    format!("{:.2}", a / b)
                } else {
                    "—".into()
                }
            };
            s.push_str(&format!(
                "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                r.system,
                r.cipher,
                single,
                ratio(single, median(&direct.single_mib_s)),
                ratio(single, median(&ossh.single_mib_s)),
                if multi > 0.0 {
                    format!("{multi:.0}")
                } else {
                    "—".into()
                },
                ratio(multi, median(&ossh.multi_mib_s)),
                if r.p50_us > 0.0 {
                    format!("{:.0} / {:.0}", r.p50_us, r.p99_us)
                } else {
                    "—".into()
                },
                if r.p99_us > 0.0 && r.system != "direct loopback" {
                    format!("{:+.0} µs", r.p99_us - direct.p99_us)
                } else {
                    "—".into()
                },
                r.rss_per_stream_kib
                    .map(|k| format!("{k:.1} KiB"))
                    .unwrap_or_else(|| "—".into()),
                r.cpu_s_per_gib
                    .map(|c| format!("{c:.2}"))
                    .unwrap_or_else(|| "—".into()),
            ));
        }
    }
    for ph in phases {
        if let Some(r) = ph
            .rows
            .iter()
            .find(|r| r.system.starts_with("Postern (Rust"))
        {
            s.push_str(&format!(
                "\nPostern, {}: {:.0} tunnel set-ups/s (TCP + key exchange + certificate login + tcpip-forward, 64 at a time, {} agents); proxy RSS per idle tunnel {:.1} KiB.",
                r.cipher, ph.setups_per_s, cli.agents, ph.tunnel_rss_kib
            ));
        }
    }
    s.push('\n');
    s
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.services {
        let (sink, echo) = (sink_service().await?, echo_service().await?);
        println!("{sink} {echo}");
        // Until the parent goes away (its end of stdin closes).
        let _ = tokio::task::spawn_blocking(|| {
            use std::io::Read;
            let mut buf = [0u8; 1];
            let _ = std::io::stdin().read(&mut buf);
        })
        .await;
        return Ok(());
    }
    if let Some(cipher) = &cli.phase {
        let out = phase(&cli, cipher).await?;
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let mut phases = Vec::new();
    for cipher in &cli.ciphers {
        eprintln!("== {cipher}");
        let mut args: Vec<String> = std::env::args().skip(1).collect();
        args.extend(["--phase".into(), cipher.clone()]);
        let out = Command::new(&exe)
            .args(&args)
            .env("POSTERN_SSH_CIPHERS", cipher)
            .stderr(Stdio::inherit())
            .output()
            .await?;
        if !out.status.success() {
            bail!("phase {cipher} failed");
        }
        phases.push(serde_json::from_slice::<Phase>(&out.stdout).context("phase output")?);
    }
    let t = table(&phases, &cli);
    println!("{t}");
    if let Some(m) = &cli.markdown {
        std::fs::write(m, &t)?;
    }
    Ok(())
}
