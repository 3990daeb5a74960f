//! `postern-agent`: load config, run the reconnect loop until SIGTERM/SIGINT.

use std::path::PathBuf;

use clap::Parser;
use postern_agent::AgentConfig;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "postern-agent",
    version = postern_ops::VERSION,
    about = "Postern agent: holds a reverse tunnel out to a proxy and serves local targets through it"
)]
struct Cli {
    /// Log lines as `text` (coloured only on a terminal; `NO_COLOR` honoured) or `json`.
    #[arg(
        long,
        global = true,
        env = "POSTERN_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    log_format: postern_ops::LogFormat,
    /// TOML config file.
    #[arg(long, short)]
    config: PathBuf,
    /// Override the proxy's web address.
    #[arg(long)]
    proxy: Option<String>,
    /// Serve `/metrics`, `/healthz`, `/readyz` here (overrides `ops_listen`).
    #[arg(long, env = "POSTERN_AGENT_OPS_LISTEN")]
    ops_listen: Option<std::net::SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    postern_ops::init_logging(cli.log_format, "info,russh=warn");
    // The file, then `POSTERN_AGENT_*` environment overrides, then these flags.
    let mut config = AgentConfig::load(&cli.config)?;
    if let Some(p) = cli.proxy {
        config.proxy = Some(p);
    }
    if let Some(a) = cli.ops_listen {
        config.ops_listen = Some(a);
    }
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        token.cancel();
    });
    postern_agent::run(config, shutdown).await?;
    Ok(())
}
