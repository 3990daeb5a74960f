//! `postern-proxy`: parse flags, load config, bind, run until SIGTERM/SIGINT. Also `certs` to mint
//! CAs and certificates until the Auth server does.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use postern_proxy::mint::{self, CertSpec};
use postern_proxy::{Listeners, ProxyConfig};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "postern-proxy",
    version = postern_ops::VERSION,
    about = "Postern edge proxy: reverse tunnels from agents, streams from clients"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
    /// Log lines as `text` (coloured only on a terminal; `NO_COLOR` honoured) or `json`.
    #[arg(
        long,
        global = true,
        env = "POSTERN_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    log_format: postern_ops::LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run(RunArgs),
    /// Mint SSH CAs and certificates.
    #[command(subcommand)]
    Certs(Certs),
}

#[derive(Args, Default)]
struct RunArgs {
    /// TOML config file; without it, defaults apply.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Web (HTTPS discovery) listen address [default 0.0.0.0:3080].
    #[arg(long)]
    web_listen: Option<std::net::SocketAddr>,
    /// Tunnel (SSH) listen address [default 0.0.0.0:3024].
    #[arg(long)]
    tunnel_listen: Option<std::net::SocketAddr>,
    /// Ops (metrics, health) listen address [default 127.0.0.1:3081].
    #[arg(long)]
    ops_listen: Option<std::net::SocketAddr>,
    /// Data directory for generated keys [default /var/lib/postern-proxy].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Start even as root (the proxy needs no privileges; prefer CAP_NET_BIND_SERVICE).
    #[arg(long)]
    allow_root: bool,
}

#[derive(Subcommand)]
enum Certs {
    /// Create a cluster's SSH host CA and user CA in DIR (host_ca, user_ca and their .pub).
    Init {
        /// Directory to write to.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a certificate signed by a CA key.
    Issue(IssueArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    /// An agent's host certificate (needs --cluster and --host-id).
    Agent,
    /// A client's user certificate (needs --user).
    User,
    /// A proxy's host certificate (needs --principal, repeatable).
    Proxy,
}

#[derive(Args)]
struct IssueArgs {
    /// CA private key file.
    #[arg(long)]
    ca: PathBuf,
    /// What the certificate is for.
    #[arg(long, value_enum)]
    kind: Kind,
    /// Output key path: writes KEY (0600), KEY.pub and KEY-cert.pub. With --public-key, only
    /// KEY-cert.pub is written.
    #[arg(long)]
    out: PathBuf,
    /// Sign this existing public key instead of generating a key pair.
    #[arg(long)]
    public_key: Option<PathBuf>,
    /// Cluster (agent).
    #[arg(long)]
    cluster: Option<String>,
    /// Host id (agent).
    #[arg(long)]
    host_id: Option<String>,
    /// User name (user).
    #[arg(long)]
    user: Option<String>,
    /// Principal (proxy), repeatable.
    #[arg(long)]
    principal: Vec<String>,
    /// Validity, e.g. 30m, 8h, 30d [default 8h].
    #[arg(long, default_value = "8h")]
    ttl: String,
}

/// The one duration syntax of every Postern command (`30m`, `8h`, `30d`, `1d12h`).
fn parse_ttl(s: &str) -> anyhow::Result<u64> {
    postern_api::duration::parse_secs(s).map_err(|e| anyhow::anyhow!("--ttl: {e}"))
}

fn certs(cmd: Certs) -> anyhow::Result<()> {
    match cmd {
        Certs::Init { dir } => {
            for name in ["host_ca", "user_ca"] {
                let path = dir.join(name);
                if path.exists() {
                    bail!("{} exists: refusing to overwrite a CA", path.display());
                }
                mint::write_key_pair(&path, &mint::generate_key())?;
                println!("wrote {} and {}.pub", path.display(), path.display());
            }
            Ok(())
        }
        Certs::Issue(a) => {
            let ca = mint::read_key(&a.ca).with_context(|| format!("CA key {}", a.ca.display()))?;
            let spec = match a.kind {
                Kind::Agent => CertSpec::Agent {
                    host_id: a.host_id.context("--kind agent needs --host-id")?,
                    cluster: a.cluster.context("--kind agent needs --cluster")?,
                },
                Kind::User => CertSpec::User {
                    user: a.user.context("--kind user needs --user")?,
                },
                Kind::Proxy => {
                    if a.principal.is_empty() {
                        bail!(
                            "--kind proxy needs at least one --principal (the names clients dial)"
                        );
                    }
                    CertSpec::Proxy {
                        principals: a.principal,
                    }
                }
            };
            let public = match &a.public_key {
                Some(p) => {
                    let text =
                        std::fs::read_to_string(p).with_context(|| p.display().to_string())?;
                    russh::keys::PublicKey::from_openssh(text.trim())
                        .with_context(|| p.display().to_string())?
                }
                None => {
                    let key = mint::generate_key();
                    mint::write_key_pair(&a.out, &key)?;
                    key.public_key().clone()
                }
            };
            let now = mint::now_unix();
            let cert = mint::issue(
                &ca,
                &public,
                &spec,
                now.saturating_sub(60),
                now + parse_ttl(&a.ttl)?,
            )?;
            let path = mint::cert_path(&a.out);
            mint::write_cert(&path, &cert)?;
            println!("wrote {}", path.display());
            Ok(())
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    // The file, then `POSTERN_PROXY_*` environment overrides, then these flags.
    let mut config = ProxyConfig::load(args.config.as_deref())?;
    if let Some(a) = args.web_listen {
        config.listen.web = a;
    }
    if let Some(a) = args.tunnel_listen {
        config.listen.tunnel = a;
    }
    if let Some(a) = args.ops_listen {
        config.listen.ops = a;
    }
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    config.allow_root |= args.allow_root;
    config.validate()?;
    // Checked before binding, as `run` does too, so that a refusal leaves no port half-open.
    if postern_proxy::mint::running_as_root() && !config.allow_root {
        bail!(postern_proxy::ProxyError::Root);
    }
    let listeners = Listeners::bind(&config).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(signal(shutdown.clone()));
    postern_proxy::run(listeners, config, shutdown).await?;
    Ok(())
}

/// SIGTERM or SIGINT, as one future.
async fn signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    token.cancel();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    postern_ops::init_logging(cli.log_format, "info,russh=warn");
    match cli.command {
        Some(Command::Certs(c)) => certs(c),
        Some(Command::Run(a)) => tokio::runtime::Runtime::new()?.block_on(run(a)),
        None => tokio::runtime::Runtime::new()?.block_on(run(cli.run)),
    }
}
