//! `postern-auth`: parses flags, binds the API listener, calls [`postern_auth::run`].

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use postern_auth::AuthConfig;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "postern-auth", version = postern_ops::VERSION, about = "The Postern Auth server")]
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

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the Auth server (creating the cluster at the first start).
    Start {
        /// auth.toml [default: built-in defaults].
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Overrides `data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Overrides `listen` (the API address).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Overrides `cluster` (needed at the first start).
        #[arg(long)]
        cluster: Option<String>,
        /// Start even as root.
        #[arg(long)]
        allow_root: bool,
        /// Overrides `ops_listen` (`/metrics`, `/healthz`, `/readyz`).
        #[arg(long, env = "POSTERN_AUTH_OPS_LISTEN")]
        ops_listen: Option<SocketAddr>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    postern_ops::init_logging(cli.log_format, "info");
    let Command::Start {
        config,
        data_dir,
        listen,
        cluster,
        allow_root,
        ops_listen,
    } = cli.command;
    // The file, then `POSTERN_AUTH_*` environment overrides, then these flags.
    let mut cfg = AuthConfig::load(config.as_deref())?;
    if let Some(d) = data_dir {
        cfg.data_dir = d;
    }
    if let Some(l) = listen {
        cfg.listen = l;
    }
    if cluster.is_some() {
        cfg.cluster = cluster;
    }
    cfg.allow_root |= allow_root;
    if ops_listen.is_some() {
        cfg.ops_listen = ops_listen;
    }
    cfg.validate()?;
    // Checked before binding, so a refusal never leaves a port half-open.
    let prepared = postern_auth::server::prepare(&cfg)?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        s.cancel();
    });
    postern_auth::server::serve(listener, prepared, shutdown).await?;
    Ok(())
}
