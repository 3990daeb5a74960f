//! # postern-demo: the whole path on one machine
//!
//! [`auth_flow::run`] is the main demo: an Auth server that dials out to a proxy, the admin steps,
//! and an API client calling the Auth API through the tunnel (GetRole allowed, UpsertRole denied).
//!
//! [`run`] is the tunnel alone: it mints CAs in a directory, writes `proxy.toml` and
//! `agent.toml` there, starts the proxy and an agent serving an echo service, and makes a client
//! call through the tunnel, printing the `ssh -W` line to try by hand.

pub mod auth_flow;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use postern_agent::AgentConfig;
use postern_client::{ConnectOptions, ProxyAddr, ProxySession};
use postern_dial::ssh::Identity;
use postern_dial::web::WebTrust;
use postern_proxy::mint::{self, CertSpec};
use postern_proxy::{Listeners, ProxyConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The cluster name the demo uses.
pub const CLUSTER: &str = "demo";

/// What a finished demo call shows.
#[derive(Debug)]
pub struct Report {
    /// What the echo service sent back through the tunnel.
    pub echoed: String,
    /// The `ssh -W` command line to try by hand.
    pub ssh_command: String,
    /// The proxy's web address.
    pub web: SocketAddr,
}

/// A running demo: its parts stop when `shutdown` is cancelled.
pub struct Demo {
    /// Stops proxy and agent.
    pub shutdown: CancellationToken,
    /// The client's logged-in session with the proxy (open more streams with it).
    pub session: ProxySession,
    proxy: tokio::task::JoinHandle<Result<(), postern_proxy::ProxyError>>,
    agent: tokio::task::JoinHandle<Result<(), postern_agent::AgentError>>,
}

impl Demo {
    /// Stops everything and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.agent.await??;
        self.proxy.await??;
        Ok(())
    }
}

pub(crate) fn step(n: u32, text: &str) {
    println!("[{n}] {text}");
}

async fn echo_service() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

fn line(key: &russh::keys::PublicKey) -> anyhow::Result<String> {
    Ok(key.to_openssh()?)
}

/// Runs the demo in `dir` and makes one client call. Leaves proxy and agent running.
pub async fn run(dir: &Path) -> anyhow::Result<(Demo, Report)> {
    run_with_target(dir, None).await
}

/// Runs the demo with the agent serving `target` as `auth` instead of the demo echo service
/// (the echo call is then skipped).
pub async fn run_with_target(
    dir: &Path,
    target: Option<SocketAddr>,
) -> anyhow::Result<(Demo, Report)> {
    step(
        1,
        &format!("minting the cluster '{CLUSTER}' CAs in {}", dir.display()),
    );
    let host_ca = mint::generate_key();
    let user_ca = mint::generate_key();
    mint::write_key_pair(&dir.join("host_ca"), &host_ca)?;
    mint::write_key_pair(&dir.join("user_ca"), &user_ca)?;

    step(
        2,
        "starting the proxy (web, tunnel and ops listeners on 127.0.0.1)",
    );
    let proxy_dir = dir.join("proxy");
    let proxy_toml = format!(
        "data_dir = {proxy_dir:?}\n# The demo may run as root (a fresh container); a real proxy should not.\nallow_root = true\n\n[listen]\nweb = \"127.0.0.1:0\"\ntunnel = \"127.0.0.1:0\"\nops = \"127.0.0.1:0\"\n\n\
         [[clusters]]\nname = \"{CLUSTER}\"\nhost_ca = [{:?}]\nuser_ca = [{:?}]\n",
        line(host_ca.public_key())?,
        line(user_ca.public_key())?,
    );
    std::fs::write(dir.join("proxy.toml"), &proxy_toml)?;
    let config = ProxyConfig::from_file(&dir.join("proxy.toml"))?;
    config.validate()?;
    let proxy_key = mint::generate_key();
    let proxy_cert = mint::issue(
        &host_ca,
        proxy_key.public_key(),
        &CertSpec::Proxy {
            principals: vec!["127.0.0.1".into(), "localhost".into()],
        },
        mint::now_unix() - 60,
        mint::now_unix() + 86400,
    )?;
    mint::write_key_pair(&config.host_key_path(), &proxy_key)?;
    mint::write_cert(&config.host_cert_path(), &proxy_cert)?;
    let listeners = Listeners::bind(&config).await?;
    let web = listeners.web.local_addr()?;
    let tunnel = listeners.tunnel.local_addr()?;
    let ops = listeners.ops.local_addr()?;
    let shutdown = CancellationToken::new();
    let proxy = tokio::spawn(postern_proxy::run(listeners, config, shutdown.clone()));
    let web_fp = wait_web_cert(&proxy_dir.join("web.crt")).await?;
    println!("    web https://{web}  tunnel ssh://{tunnel}  ops http://{ops}/metrics");
    println!("    web certificate SHA-256 {web_fp}");

    step(
        3,
        "starting the demo echo service and an agent that dials OUT to the proxy",
    );
    let echo = match target {
        Some(t) => t,
        None => echo_service().await?,
    };
    let agent_key = dir.join("agent_key");
    let (k, c) = issue(
        &host_ca,
        &CertSpec::Agent {
            host_id: "auth-1".into(),
            cluster: CLUSTER.into(),
        },
    )?;
    mint::write_key_pair(&agent_key, &k)?;
    mint::write_cert(&mint::cert_path(&agent_key), &c)?;
    let agent_toml = format!(
        "host_id = \"auth-1\"\ncluster = \"{CLUSTER}\"\nproxy = \"{web}\"\nhost_key_file = {agent_key:?}\n\
         proxy_host_ca = [{:?}]\n\n[web]\ncert_sha256 = \"{web_fp}\"\n\n[targets]\nauth = \"{echo}\"\n",
        line(host_ca.public_key())?,
    );
    std::fs::write(dir.join("agent.toml"), &agent_toml)?;
    let agent_config = AgentConfig::from_file(&dir.join("agent.toml"))?;
    let agent = tokio::spawn(postern_agent::run(agent_config, shutdown.clone()));
    println!("    echo service on {echo}, served as target 'auth' of cluster '{CLUSTER}'");

    step(
        4,
        "a client discovers the tunnel from the web address, logs in with a user certificate, and calls the service",
    );
    let user_key = dir.join("alice");
    let (k, c) = issue(
        &user_ca,
        &CertSpec::User {
            user: "alice".into(),
        },
    )?;
    mint::write_key_pair(&user_key, &k)?;
    mint::write_cert(&mint::cert_path(&user_key), &c)?;
    let opts = ConnectOptions {
        proxy: ProxyAddr::Web {
            addr: web.to_string(),
            trust: WebTrust::Pin(web_fp.clone()),
        },
        user: "alice".into(),
        identity: Identity::new(k, c).map_err(anyhow::Error::msg)?,
        proxy_host_cas: vec![tunnel_proto::certs::ca_fingerprint(host_ca.public_key())],
        proxy_host_keys: vec![],
    };
    let session = ProxySession::connect(&opts).await?;
    println!("    discovered tunnel address {}", session.tunnel_addr);
    let mut stream = None;
    for _ in 0..250 {
        match session.open("auth", CLUSTER, 3025).await {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let mut stream = stream.context("the agent's tunnel did not come up within 5 s")?;
    let msg: &[u8] = if target.is_none() {
        b"hello from alice through the Postern tunnel"
    } else {
        b""
    };
    stream.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    stream.read_exact(&mut back).await?;
    drop(stream);
    let echoed = String::from_utf8_lossy(&back).into_owned();
    println!("    sent:     {}", String::from_utf8_lossy(msg));
    println!("    received: {echoed}");
    if back != msg {
        bail!("the echo did not match");
    }

    let known_hosts = dir.join("known_hosts");
    std::fs::write(
        &known_hosts,
        format!("@cert-authority * {}\n", line(host_ca.public_key())?),
    )?;
    let ssh_command = format!(
        "ssh -F /dev/null -o IdentitiesOnly=yes -o UserKnownHostsFile={} -o CertificateFile={} -i {} -p {} -l alice -W auth.{CLUSTER}:3025 127.0.0.1",
        known_hosts.display(),
        mint::cert_path(&user_key).display(),
        user_key.display(),
        tunnel.port()
    );
    step(
        5,
        "the same stream with plain OpenSSH (type a line, it comes back; Ctrl-D to end):",
    );
    println!("    {ssh_command}");
    Ok((
        Demo {
            shutdown,
            session,
            proxy,
            agent,
        },
        Report {
            echoed,
            ssh_command,
            web,
        },
    ))
}

fn issue(
    ca: &russh::keys::PrivateKey,
    spec: &CertSpec,
) -> anyhow::Result<(russh::keys::PrivateKey, russh::keys::Certificate)> {
    let key = mint::generate_key();
    let now = mint::now_unix();
    let cert = mint::issue(ca, key.public_key(), spec, now - 60, now + 86400)?;
    Ok((key, cert))
}

pub(crate) async fn wait_web_cert(path: &Path) -> anyhow::Result<String> {
    use rustls_pki_types::pem::PemObject;
    for _ in 0..500 {
        if let Ok(pem) = std::fs::read(path)
            && let Ok(der) = rustls_pki_types::CertificateDer::from_pem_slice(&pem)
        {
            return Ok(postern_dial::web::cert_fingerprint(&der));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("the proxy did not write {}", path.display())
}

/// Where the demo keeps its files when the caller gives no directory.
pub fn default_dir() -> anyhow::Result<PathBuf> {
    Ok(tempfile::Builder::new()
        .prefix("postern-demo-")
        .tempdir()?
        .keep())
}
