//! `postern-demo`: run the local demo (the Auth server reached through the proxy's tunnel), then
//! keep it up until Ctrl-C (or exit at once with `--once`). `--tunnel-only` runs the echo demo.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "postern-demo",
    about = "Auth server + proxy + reverse tunnel + an API client call through it, on loopback"
)]
struct Cli {
    /// Exit after the client call instead of waiting for Ctrl-C.
    #[arg(long)]
    once: bool,
    /// Run the tunnel alone with an echo service (no Auth server).
    #[arg(long)]
    tunnel_only: bool,
    /// Directory for keys, certificates and configs [default: a new temp dir].
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let dir = match cli.dir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            d
        }
        None => postern_demo::default_dir()?,
    };
    let shown = dir.clone();
    let wait = |once: bool| async move {
        let dir = shown;
        if !once {
            println!(
                "\nRunning. Ctrl-C to stop (files stay in {}).",
                dir.display()
            );
            tokio::signal::ctrl_c().await?;
        }
        anyhow::Ok(())
    };
    if cli.tunnel_only {
        let (demo, _report) = postern_demo::run(&dir).await?;
        wait(cli.once).await?;
        demo.stop().await?;
    } else {
        let (demo, _report) = postern_demo::auth_flow::run(&dir).await?;
        wait(cli.once).await?;
        demo.stop().await?;
    }
    println!("stopped");
    Ok(())
}
