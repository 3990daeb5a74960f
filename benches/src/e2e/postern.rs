//! The Postern side: a `postern-proxy` and a `postern-agent` (the real release binaries) with
//! certificates minted for the run, the agent on SSH or on QUIC, and a logged-in client session.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use postern_client::{ConnectOptions, ProxyAddr, ProxySession};
use postern_dial::mint::{self, CertSpec};
use postern_dial::ssh::Identity;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

use super::support::{Guard, free_port, wait_port};

/// The transport the agent dials the proxy on (the measuring client uses SSH, except in the row of
/// a client on QUIC: [`PosternSetup::connect_quic_client`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentTransport {
    /// SSH over TCP, with Postern's per-stream credit (`tunnel_proto::credit`).
    Ssh,
    /// QUIC over UDP (the tunnel port's UDP twin), with QUIC's own per-stream flow control.
    Quic,
}

impl AgentTransport {
    /// The value of the agent's `transport.mode` and of the proxy's `transport` metric label.
    pub fn label(self) -> &'static str {
        match self {
            AgentTransport::Ssh => "ssh",
            AgentTransport::Quic => "quic",
        }
    }
}

impl fmt::Display for AgentTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AgentTransport::Ssh => "SSH",
            AgentTransport::Quic => "QUIC",
        })
    }
}

/// Where the Postern binaries send the targets.
#[derive(Debug, Clone, Copy)]
pub struct Targets {
    /// `sink.bench`.
    pub sink: SocketAddr,
    /// `echo.bench`.
    pub echo: SocketAddr,
    /// `hose.bench`.
    pub hose: SocketAddr,
}

/// A running proxy and agent, and a client session logged in to the proxy.
pub struct PosternSetup {
    _proxy: Guard,
    _agent: Guard,
    /// The proxy's pid.
    pub proxy_pid: u32,
    /// The agent's pid.
    pub agent_pid: u32,
    /// The proxy's tunnel listener (TCP; QUIC on its UDP twin).
    pub tunnel: SocketAddr,
    /// The proxy's ops listener (`/metrics`).
    pub ops: SocketAddr,
    /// The transport the agent was told to use (and was seen using).
    pub transport: AgentTransport,
    /// The client session the measurements use.
    pub session: Arc<ProxySession>,
    /// How to log in another client session (the isolation figure's second client).
    pub client: ConnectOptions,
    /// The cluster's host CA (signs the proxy, the agent, and the agents of the login figure).
    pub host_ca: russh::keys::PrivateKey,
    /// The user's key (its certificate beside it), for `ssh -W`.
    pub user_key: PathBuf,
    /// `@cert-authority` line for `ssh -W`.
    pub known_hosts: PathBuf,
    /// The proxy's configuration file.
    pub proxy_config: PathBuf,
    /// The agent's configuration file.
    pub agent_config: PathBuf,
    /// The agent's stderr.
    pub agent_log: PathBuf,
}

/// Starts a proxy and an agent on `transport` in `dir` (created), logs a client in, and waits
/// until the agent's tunnel is up on that transport: fails if it came up on the other one.
/// `quic_mtu` sets both ends' QUIC path MTU discovery bound (`quic.mtu_upper_bound`,
/// `transport.quic_mtu_upper_bound`); `None` leaves the default (1452).
pub async fn start_postern(
    dir: &Path,
    bin: &Path,
    targets: Targets,
    transport: AgentTransport,
    quic_mtu: Option<u16>,
) -> anyhow::Result<PosternSetup> {
    let mtu_line = |key: &str| {
        quic_mtu
            .map(|m| format!("{key} = {m}\n"))
            .unwrap_or_default()
    };
    std::fs::create_dir_all(dir)?;
    let host_ca = mint::generate_key();
    let user_ca = mint::generate_key();
    let now = mint::now_unix();
    let line =
        |k: &russh::keys::PrivateKey| k.public_key().to_openssh().map_err(anyhow::Error::from);
    let (web, tunnel, ops) = (free_port()?, free_port()?, free_port()?);
    let pdir = dir.join("proxy");
    let proxy_config = dir.join("proxy.toml");
    // QUIC is on by default, on the tunnel port's UDP twin; say so, so that the run does not
    // depend on a default.
    std::fs::write(
        &proxy_config,
        format!(
            "data_dir = {pdir:?}\nallow_root = true\n[listen]\nweb = \"127.0.0.1:{web}\"\ntunnel = \"127.0.0.1:{tunnel}\"\nops = \"127.0.0.1:{ops}\"\n\
             [quic]\nenabled = true\nlisten = \"127.0.0.1:{tunnel}\"\n{}\
             [limits]\nmax_unauthenticated = 4096\nmax_unauthenticated_per_source = 4096\nmax_streams_per_user_per_target = 100000\nmax_streams_per_tunnel = 100000\nmax_streams_per_client = 100000\nmax_tunnels_per_cluster = 100000\nmax_connects_per_source_per_minute = 100000\n\
             [[clusters]]\nname = \"bench\"\nhost_ca = [{:?}]\nuser_ca = [{:?}]\npolicy = {{ source = \"open\" }}\n",
            mtu_line("mtu_upper_bound"),
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
            .arg(&proxy_config)
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
    let agent_config = dir.join("agent.toml");
    let transport_toml = match transport {
        AgentTransport::Ssh => "[transport]\nmode = \"ssh\"\n".to_string(),
        AgentTransport::Quic => {
            // The idle-stream figure holds 10,000 streams on one tunnel: the agent's default
            // of 10,000 concurrent QUIC streams would leave no room for the streams of the
            // figures before it, whose QUIC stream credit comes back only after they close.
            format!(
                "[transport]\nmode = \"quic\"\nquic_addr = \"127.0.0.1:{tunnel}\"\nquic_max_streams = 20000\n{}",
                mtu_line("quic_mtu_upper_bound")
            )
        }
    };
    std::fs::write(
        &agent_config,
        format!(
            "host_id = \"a1\"\ncluster = \"bench\"\ntunnel_addr = \"127.0.0.1:{tunnel}\"\nhost_key_file = {akey_path:?}\n\
             proxy_host_ca = [{:?}]\n[web]\ninsecure = true\n[targets]\nsink = \"{}\"\necho = \"{}\"\nhose = \"{}\"\n{transport_toml}",
            line(&host_ca)?,
            targets.sink,
            targets.echo,
            targets.hose,
        ),
    )?;
    let agent_log = dir.join("agent.log");
    let agent = Guard(
        Command::new(bin.join("postern-agent"))
            .arg("--config")
            .arg(&agent_config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&agent_log)?)
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
    let client = ConnectOptions {
        proxy: ProxyAddr::Tunnel(format!("127.0.0.1:{tunnel}")),
        user: "bench".into(),
        identity: Identity::new(ukey, ucert).map_err(anyhow::Error::msg)?,
        proxy_host_cas: vec![tunnel_proto::certs::ca_fingerprint(host_ca.public_key())],
        proxy_host_keys: vec![],
    };
    let session = Arc::new(ProxySession::connect(&client).await?);
    let ops: SocketAddr = format!("127.0.0.1:{ops}").parse()?;
    wait_for_tunnel(ops, transport, &agent_log).await?;
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
        ops,
        transport,
        session,
        client,
        host_ca,
        user_key,
        known_hosts,
        proxy_config,
        agent_config,
        agent_log,
    })
}

impl PosternSetup {
    /// Another client session (same user), for a second client.
    pub async fn connect_client(&self) -> anyhow::Result<Arc<ProxySession>> {
        Ok(Arc::new(ProxySession::connect(&self.client).await?))
    }

    /// Another client session (same user) that logs in over QUIC, with path MTU discovery up
    /// to `mtu_upper_bound`.
    pub async fn connect_quic_client(
        &self,
        mtu_upper_bound: u16,
    ) -> anyhow::Result<Arc<ProxySession>> {
        let dial = postern_client::DialOptions {
            transport: postern_client::Transport::Quic,
            quic_mtu_upper_bound: mtu_upper_bound,
        };
        Ok(Arc::new(
            ProxySession::connect_with(&self.client, dial).await?,
        ))
    }

    /// Fails unless the proxy still counts one agent tunnel of cluster `bench` on this
    /// setup's transport (the agent did not fall back or reconnect on the other one).
    pub async fn check_transport(&self) -> anyhow::Result<()> {
        let text = scrape(self.ops).await?;
        if tunnels_on(&text, self.transport) == 0 {
            bail!(
                "the agent's tunnel is no longer on {} (proxy metrics: {:?})",
                self.transport,
                tunnel_lines(&text)
            );
        }
        Ok(())
    }

    /// The proxy's `postern_bytes_proxied_total{direction="agent_to_client"}`: payload bytes it
    /// has passed on toward clients.
    pub async fn bytes_to_clients(&self) -> anyhow::Result<u64> {
        let text = scrape(self.ops).await?;
        Ok(text
            .lines()
            .filter(|l| {
                l.starts_with("postern_bytes_proxied_total{")
                    && l.contains("direction=\"agent_to_client\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64)
    }
}

/// `GET /metrics` from the proxy's ops listener (HTTP/1.0, read to EOF): the body.
pub async fn scrape(ops: SocketAddr) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(ops).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut text))
        .await
        .context("the proxy's /metrics did not answer in 5 s")??;
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or(&text)
        .to_owned())
}

fn tunnel_lines(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| l.starts_with("postern_tunnels_connected{"))
        .collect()
}

/// The proxy's `postern_tunnels_connected` gauge of cluster `bench` on `t`.
fn tunnels_on(text: &str, t: AgentTransport) -> u64 {
    let label = format!("transport=\"{}\"", t.label());
    tunnel_lines(text)
        .into_iter()
        .filter(|l| l.contains(&label) && l.contains("cluster=\"bench\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Waits (at most 20 s) until the proxy's metrics show the agent's tunnel on `t`; fails loudly,
/// with what the metrics and the agent's log say, when it is not.
async fn wait_for_tunnel(ops: SocketAddr, t: AgentTransport, log: &Path) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < Duration::from_secs(20) {
        if let Ok(text) = scrape(ops).await {
            if tunnels_on(&text, t) >= 1 {
                return Ok(());
            }
            last = tunnel_lines(&text).join("; ");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(10).collect();
    bail!(
        "the agent was told to use {t} but after 20 s the proxy shows no {t} tunnel \
         (postern_tunnels_connected: {last:?}); the agent's log ends with: {:?}",
        tail.into_iter().rev().collect::<Vec<_>>()
    )
}
